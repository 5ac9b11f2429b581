//! Read balancing (seed 004 FIG. 9, `read_policy = "balanced"`) and
//! `on_primary_failure` end to end: a primary and a mirror as real
//! processes, real clients (fio with verify, qemu-io patterns), faults
//! injected into the primary's backend at run time through
//! `POST /volumes/{name}/faults` (`fault_injection = true`).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

/// A minimal HTTP/1.1 POST with a JSON body; (status code, body).
fn http_post(addr: SocketAddr, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

/// Sets the primary's injected faults (JSON of `FaultRequest`).
fn set_faults(pair: &Pair, json: &str) {
    let (code, body) = http_post(
        pair.primary.admin,
        &format!("/volumes/{PAIR_VOLUME}/faults"),
        json,
    );
    assert_eq!(code, 200, "setting faults {json}: {body}");
}

/// The sample of `name` whose labels include `label` (e.g. `path="local"`).
fn sample(body: &str, name: &str, label: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// (reads served locally, reads served by the mirror) on the primary.
fn reads(pair: &Pair) -> (f64, f64) {
    let m = pair.primary.metrics();
    let peer = pair.link()["peer"].as_str().unwrap().to_owned();
    (
        sample(&m, "blockmirror_reads_total", "path=\"local\""),
        sample(&m, "blockmirror_reads_total", &format!("path=\"{peer}\"")),
    )
}

/// fio over the first `size` of the export with a crc32c header in every
/// block: `write` writes and verifies; otherwise only verifies what a
/// write run with the same parameters left (random 4 KiB reads at QD 32).
fn fio_verify(uri: &str, size: &str, write: bool) -> String {
    fio_verify_at(uri, "0", size, write)
}

/// [`fio_verify`] over `size` bytes from `offset`.
fn fio_verify_at(uri: &str, offset: &str, size: &str, write: bool) -> String {
    let mut c = Command::new("fio");
    c.args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        &format!("--offset={offset}"),
        &format!("--size={size}"),
        "--verify=crc32c",
        "--verify_fatal=1",
        "--randseed=42",
    ]);
    if !write {
        c.arg("--verify_only");
    }
    let out = run(c.stdout(Stdio::piped()).stderr(Stdio::piped()));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fio failed ({}):\n{text}", out.status);
    assert!(text.contains("err= 0"), "fio reported errors:\n{text}");
    assert!(!text.contains("verify: bad"), "fio found bad data:\n{text}");
    text
}

/// qemu-io commands against `uri`; (success, output).
fn qemu_io(uri: &str, cmds: &[&str]) -> (bool, String) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run(c.arg(uri));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let ok = out.status.success() && !text.contains("failed") && !text.contains("error");
    (ok, text)
}

/// One NBD FLUSH on a fresh connection; the reply's error (0: done, 5: EIO).
fn nbd_flush(uri: &str) -> u32 {
    use blockmirror_testkit::nbd;
    const CMD_FLUSH: u16 = 3;
    let mut c = nbd::connect(&nbd::Uri::parse(uri).unwrap()).unwrap();
    let mut buf = bytes::BytesMut::new();
    nbd::request(CMD_FLUSH, 0, 1, 0, 0, &mut buf);
    c.stream.write_all(&buf).unwrap();
    let (error, cookie) = nbd::read_simple_reply(&mut c.stream).unwrap();
    assert_eq!(cookie, 1);
    error
}

fn balanced_pair(mirror_table: &str) -> Pair {
    require_tool("fio");
    require_tool("qemu-io");
    PairBuilder::new(64 * MIB)
        .primary_volume("read_policy = \"balanced\"\nfault_injection = true")
        .mirror_table(mirror_table)
        .start()
}

#[test]
fn balanced_reads_return_the_data_and_stay_mostly_local_on_a_healthy_pair() {
    let pair = balanced_pair("mode = \"sync\"");
    fio_verify(pair.primary.uri(), "16M", true);
    let (l0, m0) = reads(&pair);
    fio_verify(pair.primary.uri(), "16M", false);
    let (l1, m1) = reads(&pair);
    let (local, mirror) = (l1 - l0, m1 - m0);
    // 16 MiB of 4 KiB reads: 4096, every one served.
    assert!(local + mirror >= 4096.0, "local {local} mirror {mirror}");
    // The page cache beats a network round trip; the mirror still sees
    // the probes that keep its estimate fresh (1 in 64 and by age).
    assert!(local > mirror, "local {local} mirror {mirror}");
    assert!(mirror >= 1.0, "probes reached the mirror: {mirror}");
    let m = pair.primary.metrics();
    for p in [
        "path=\"local\"".to_string(),
        format!("path=\"{}\"", pair.link()["peer"].as_str().unwrap()),
    ] {
        assert!(
            sample(&m, "blockmirror_read_latency_ewma_seconds", &p) > 0.0,
            "latency estimate for {p}:\n{m}"
        );
    }
    // The remote reads share a few long-lived job connections (one job
    // each), not one per read.
    let mm = pair.mirror.metrics();
    let opened = metric(&mm, "blockmirror_jobs_opened_total").unwrap_or(0.0);
    assert!(
        (1.0..=2.0).contains(&opened),
        "jobs opened on the mirror for {mirror} remote reads: {opened}"
    );
    let st = pair.primary.status_json();
    assert_eq!(st["volumes"][0]["read_policy"], "balanced", "{st}");
    assert_eq!(st["volumes"][0]["local_disk"], "ok", "{st}");
    assert_eq!(
        st["volumes"][0]["mirrors"][0]["reads_served"].as_f64(),
        Some(m1),
        "{st}"
    );
}

#[test]
fn a_slow_primary_disk_sends_the_reads_to_the_mirror() {
    let pair = balanced_pair("mode = \"sync\"");
    fio_verify(pair.primary.uri(), "16M", true);
    set_faults(&pair, r#"{"read_latency_us": 10000}"#);
    let (l0, m0) = reads(&pair);
    fio_verify(pair.primary.uri(), "16M", false);
    let (l1, m1) = reads(&pair);
    let (local, mirror) = (l1 - l0, m1 - m0);
    assert!(
        mirror > 3.0 * local,
        "with 10 ms local reads most should go to the mirror: local {local} mirror {mirror}\n{}",
        pair.primary.metrics()
    );
    // Healed: the probes bring the reads back.
    set_faults(&pair, "{}");
    wait_for(
        "reads back on the local disk",
        Duration::from_secs(60),
        || {
            let (l2, m2) = reads(&pair);
            fio_verify(pair.primary.uri(), "4M", false);
            let (l3, m3) = reads(&pair);
            ((l3 - l2) > (m3 - m2)).then_some(())
        },
    );
}

#[test]
fn no_read_goes_to_an_async_mirror() {
    let pair = balanced_pair("mode = \"async\"");
    fio_verify(pair.primary.uri(), "8M", true);
    set_faults(&pair, r#"{"read_latency_us": 10000}"#);
    fio_verify(pair.primary.uri(), "8M", false);
    let (local, mirror) = reads(&pair);
    assert_eq!(mirror, 0.0, "an async mirror may lack acknowledged writes");
    assert!(local >= 2048.0, "local {local}");
    assert_eq!(pair.link()["reads_served"], 0);
}

#[test]
fn no_read_goes_to_a_mirror_that_is_away() {
    let mut pair = balanced_pair("mode = \"sync\"");
    fio_verify(pair.primary.uri(), "8M", true);
    set_faults(&pair, r#"{"read_latency_us": 10000}"#);
    fio_verify(pair.primary.uri(), "8M", false);
    let (_, before) = reads(&pair);
    assert!(before > 0.0, "the slow disk sent reads to the mirror");
    pair.mirror.stop_with("KILL");
    // Written while the mirror is away: the mirror lacks it.
    fio_verify(pair.primary.uri(), "8M", true);
    pair.wait_link("degraded", Duration::from_secs(30), |l| {
        l["state"] != "in_sync" && l["connection"] != "connected"
    });
    let (l0, _) = reads(&pair);
    fio_verify(pair.primary.uri(), "8M", false);
    let (l1, after) = reads(&pair);
    assert_eq!(
        after, before,
        "no read went to the mirror while it was away"
    );
    assert!(l1 - l0 >= 2048.0, "every read served locally: {}", l1 - l0);
    // Back and resyncing, then in sync: reads may go there again.
    pair.mirror.restart();
    pair.wait_in_sync(Duration::from_secs(60));
    fio_verify(pair.primary.uri(), "8M", false);
    let (_, back) = reads(&pair);
    assert!(
        back > after,
        "reads return to the mirror once it is in sync"
    );
}

/// `cmp`-style check of one byte value over a range of a file.
fn assert_filled(path: &std::path::Path, offset: u64, len: u64, byte: u8) {
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, offset).unwrap();
    if let Some(i) = buf.iter().position(|&b| b != byte) {
        panic!(
            "{}: byte at {} is {:#04x}, expected {byte:#04x}",
            path.display(),
            offset + i as u64,
            buf[i]
        );
    }
}

#[test]
fn serve_from_mirror_keeps_host_io_working_after_the_disk_fails() {
    require_tool("qemu-io");
    let mut pair = PairBuilder::new(64 * MIB)
        .symmetric()
        .primary_volume("on_primary_failure = \"serve_from_mirror\"\nfault_injection = true")
        .start();
    let uri = pair.primary.uri().to_owned();
    let (ok, out) = qemu_io(&uri, &["write -P 0x11 0 8M", "flush"]);
    assert!(ok, "{out}");
    // The whole disk fails, reads and writes.
    let all = format!(r#"{{"offset": 0, "len": {}}}"#, 64 * MIB);
    set_faults(
        &pair,
        &format!(r#"{{"fail_reads": {all}, "fail_writes": {all}}}"#),
    );
    let (ok, out) = qemu_io(
        &uri,
        &[
            "read -P 0x11 0 8M",
            "write -P 0x22 8M 4M",
            "write -P 0x33 1M 64k",
            "read -P 0x22 8M 4M",
            "read -P 0x33 1M 64k",
            "read -P 0x11 2M 1M",
            "flush",
        ],
    );
    assert!(ok, "host I/O must keep succeeding: {out}\n{}", pair.logs());
    let st = pair.primary.status_json();
    assert_eq!(st["volumes"][0]["local_disk"], "failed", "{st}");
    assert!(pair.link()["reads_served"].as_u64().unwrap() > 0);
    assert_eq!(pair.primary_metric("blockmirror_local_disk_failed"), 1.0);
    let log = pair.primary.log();
    assert_eq!(
        log.matches("local disk failed: marked failed").count(),
        1,
        "logged once:\n{log}"
    );
    // fio with verify on the detached volume: every write lands on the
    // mirror only and reads back.
    require_tool("fio");
    fio_verify_at(&uri, "32M", "4M", true);

    pair.primary.stop_with("TERM");
    pair.mirror.stop_with("TERM");
    // The mirror holds every write; the failed local disk none of the later ones.
    let m = pair.mirror.image().to_owned();
    assert_filled(&m, 0, MIB, 0x11);
    assert_filled(&m, MIB, 64 << 10, 0x33);
    assert_filled(&m, 2 * MIB, 6 * MIB, 0x11);
    assert_filled(&m, 8 * MIB, 4 * MIB, 0x22);
    assert_filled(pair.primary.image(), 8 * MIB, 4 * MIB, 0);

    // A restart must not serve the stale disk: it comes back as a blank
    // mirror. The mirror that took the writes is promoted and copies the
    // whole volume to it, as to a replaced disk.
    pair.primary.restart();
    let st = pair.primary.status_json()["volumes"][0].clone();
    assert_eq!(st["role"], "mirror", "{st}");
    assert_eq!(st["state"], "inconsistent", "{st}");
    assert!(
        pair.primary
            .log()
            .contains("marked failed in an earlier run"),
        "{}",
        pair.primary.log()
    );
    pair.mirror.restart();
    let out = run(Command::new(BIN).args([
        "promote",
        PAIR_VOLUME,
        "--admin",
        &pair.mirror.admin.to_string(),
    ]));
    assert!(out.status.success(), "{out:?}");
    wait_for(
        "the full copy to the repaired side",
        Duration::from_secs(60),
        || {
            let l = pair.mirror.status_json()["volumes"][0]["mirrors"][0].clone();
            (l["connection"] == "connected" && l["state"] == "in_sync").then_some(())
        },
    );
    assert!(
        metric(&pair.mirror.metrics(), "blockmirror_resync_bytes_total").unwrap_or(0.0)
            >= (64 * MIB) as f64,
        "a stale disk gets the whole volume"
    );
    let (ok, out) = qemu_io(pair.mirror.uri(), &["flush"]);
    assert!(ok, "{out}");
    pair.assert_images_identical();
}

#[test]
fn fail_policy_returns_eio_to_the_host() {
    require_tool("qemu-io");
    let pair = PairBuilder::new(64 * MIB)
        .primary_volume("fault_injection = true")
        .start();
    let uri = pair.primary.uri().to_owned();
    let (ok, out) = qemu_io(&uri, &["write -P 0x11 0 1M", "flush"]);
    assert!(ok, "{out}");
    set_faults(&pair, r#"{"fail_reads": {"offset": 0, "len": 65536}}"#);
    let (ok, out) = qemu_io(&uri, &["read -P 0x11 0 64k"]);
    assert!(!ok && out.contains("Input/output error"), "{out}");
    set_faults(&pair, r#"{"fail_writes": {"offset": 0, "len": 65536}}"#);
    let (ok, out) = qemu_io(&uri, &["write -P 0x22 0 64k"]);
    assert!(!ok && out.contains("Input/output error"), "{out}");
    // Unfailed ranges still work, and the disk is not detached.
    let (ok, out) = qemu_io(&uri, &["read -P 0x11 512k 64k"]);
    assert!(ok, "{out}");
    let st = pair.primary.status_json();
    assert_eq!(st["volumes"][0]["local_disk"], "ok", "{st}");
}

#[test]
fn faults_are_refused_without_fault_injection() {
    let pair = PairBuilder::new(16 * MIB).start();
    let (code, body) = http_post(
        pair.primary.admin,
        &format!("/volumes/{PAIR_VOLUME}/faults"),
        r#"{"read_latency_us": 10}"#,
    );
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("fault_injection"), "{body}");
    let (code, _) = http_post(pair.primary.admin, "/volumes/nope/faults", "{}");
    assert_eq!(code, 404);
}

#[test]
fn no_read_goes_to_a_mirror_that_is_resyncing() {
    let mut pair = balanced_pair("mode = \"sync\"");
    fio_verify(pair.primary.uri(), "16M", true);
    pair.mirror.stop_with("KILL");
    // Changed while the mirror is away: 16 MiB to copy when it is back,
    // at 1 MiB/s, so it stays resyncing while we read.
    fio_verify(pair.primary.uri(), "16M", true);
    let (code, body) = http_post(
        pair.primary.admin,
        &format!("/volumes/{PAIR_VOLUME}/resync"),
        r#"{"rate": 1048576}"#,
    );
    assert_eq!(code, 200, "{body}");
    pair.mirror.restart();
    pair.wait_link("resyncing", Duration::from_secs(30), |l| {
        l["connection"] == "connected" && l["state"] == "resyncing"
    });
    set_faults(&pair, r#"{"read_latency_us": 10000}"#);
    let (l0, m0) = reads(&pair);
    fio_verify(pair.primary.uri(), "16M", false);
    let (l1, m1) = reads(&pair);
    assert_eq!(
        pair.link()["state"],
        "resyncing",
        "still resyncing after the reads"
    );
    assert_eq!(m1, m0, "no read went to a mirror that is resyncing");
    assert!(l1 - l0 >= 4096.0, "local {}", l1 - l0);
    // Unthrottled, it gets in sync, and then it serves reads.
    let (code, body) = http_post(
        pair.primary.admin,
        &format!("/volumes/{PAIR_VOLUME}/resync"),
        r#"{"rate": 0}"#,
    );
    assert_eq!(code, 200, "{body}");
    pair.wait_in_sync(Duration::from_secs(60));
    fio_verify(pair.primary.uri(), "16M", false);
    let (_, m2) = reads(&pair);
    assert!(m2 > m1, "an in-sync mirror serves reads again");
}

#[test]
fn a_failed_disk_with_no_mirror_left_gives_eio() {
    require_tool("qemu-io");
    let mut pair = PairBuilder::new(16 * MIB)
        .primary_volume("on_primary_failure = \"serve_from_mirror\"\nfault_injection = true")
        .start();
    let uri = pair.primary.uri().to_owned();
    let (ok, out) = qemu_io(&uri, &["write -P 0x11 0 1M", "flush"]);
    assert!(ok, "{out}");
    set_faults(&pair, r#"{"fail_reads": {"offset": 0, "len": 65536}}"#);
    let (ok, out) = qemu_io(&uri, &["read -P 0x11 0 64k"]);
    assert!(ok, "served by the mirror: {out}");
    assert_eq!(
        pair.primary.status_json()["volumes"][0]["local_disk"],
        "failed"
    );
    assert_eq!(nbd_flush(&uri), 0, "a FLUSH is done on the in-sync mirror");
    // The only copy goes away: nothing can serve the volume any more.
    pair.mirror.stop_with("KILL");
    pair.wait_link("away", Duration::from_secs(30), |l| {
        l["connection"] != "connected"
    });
    let (ok, out) = qemu_io(&uri, &["read -P 0x11 512k 64k"]);
    assert!(!ok && out.contains("Input/output error"), "read: {out}");
    let (ok, out) = qemu_io(&uri, &["write -P 0x22 0 64k"]);
    assert!(!ok && out.contains("Input/output error"), "write: {out}");
    // qemu-io skips a FLUSH when nothing was written since the last one:
    // send one with the test kit's raw client.
    assert_eq!(nbd_flush(&uri), 5, "FLUSH answered EIO");
    // The local disk was not touched after it failed.
    assert_filled(pair.primary.image(), 0, MIB, 0x11);
}

/// A resync whose local reads fail (the primary's disk is failing where the
/// mirror needs it) retries after a growing pause instead of spinning, keeps
/// the region marked, and completes once the disk reads again.
#[test]
fn a_failing_local_read_during_resync_is_retried_with_a_pause() {
    require_tool("qemu-io");
    let mut pair = PairBuilder::new(16 * MIB)
        .primary_volume("fault_injection = true")
        .start();
    pair.mirror.stop_with("KILL");
    pair.wait_link("away", Duration::from_secs(10), |l| {
        l["connection"] != "connected"
    });
    let (ok, out) = qemu_io(pair.primary.uri(), &["write -P 0x5c 0 1M", "flush"]);
    assert!(ok, "{out}");
    set_faults(&pair, r#"{"fail_reads": {"offset": 0, "len": 1048576}}"#);
    pair.mirror.restart();
    let errors = || pair.primary_metric("blockmirror_resync_read_errors_total");
    wait_for("catch-up read errors", Duration::from_secs(30), || {
        (errors() >= 3.0).then_some(())
    });
    // Three failed passes take 200 + 400 ms of pauses at least; a loop
    // without them would have failed thousands of times by now.
    assert!(
        errors() <= 10.0,
        "the catch-up spins: {} failed reads",
        errors()
    );
    assert_ne!(pair.link()["state"], "in_sync");
    set_faults(&pair, "{}");
    pair.wait_in_sync(Duration::from_secs(60));
    pair.flush_primary();
    pair.assert_images_identical();
}
