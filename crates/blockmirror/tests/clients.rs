//! `blockmirror serve` as a process, driven by the real NBD clients from
//! Debian's packages: nbdinfo, nbdcopy (libnbd-bin), qemu-io, qemu-img
//! (qemu-utils) and fio's nbd engine.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

#[test]
fn nbdinfo_sees_size_flags_and_block_sizes() {
    require_tool("nbdinfo");
    let node = TestNode::start(&[VolumeSpec::new("db", 64 * MIB)]);
    let out = run_ok(Command::new("nbdinfo").args(["--json", node.uri()]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["protocol"], "newstyle-fixed");
    assert_eq!(v["structured"], true);
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "db");
    assert_eq!(e["export-size"], 64 * MIB);
    assert_eq!(e["is_read_only"], false);
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
        "can_df",
    ] {
        assert_eq!(e[flag], true, "{flag} in {out}");
    }
    assert_eq!(e["block_size_minimum"], 512);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32 * MIB);
    assert_eq!(e["contexts"][0], "base:allocation");
    // nbdinfo --map reads base:allocation: a fresh sparse volume is one hole.
    let map = run_ok(Command::new("nbdinfo").args(["--map", node.uri()]));
    assert!(map.contains("hole,zero"), "map: {map}");
    // And --list shows the export.
    let list = run_ok(Command::new("nbdinfo").args(["--list", "--json", node.uri()]));
    assert!(list.contains("\"db\""), "{list}");
}

#[test]
fn qemu_io_pattern_flush_discard_zero() {
    require_tool("qemu-io");
    let node = TestNode::start(&[VolumeSpec::new("db", 64 * MIB)]);
    let io = |cmds: &[&str]| {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw"]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        c.arg(node.uri());
        let out = run_ok(&mut c);
        assert!(!out.contains("Pattern verification failed"), "{out}");
        assert!(!out.contains("error"), "{out}");
        out
    };
    io(&[
        "write -P 0xab 0 1M",
        "write -P 0xcd 4M 64k",
        "write -P 0x11 -f 8M 4k", // FUA
        "flush",
    ]);
    io(&[
        "read -P 0xab 0 1M",
        "read -P 0xcd 4M 64k",
        "read -P 0x11 8M 4k",
    ]);
    io(&["discard 0 512k", "write -z 4M 64k", "flush"]);
    io(&[
        "read -P 0 0 512k",
        "read -P 0xab 512k 512k",
        "read -P 0 4M 64k",
    ]);
    // The backing file holds exactly what qemu-io wrote.
    let img = std::fs::read(node.image()).unwrap();
    assert!(img[..512 * 1024].iter().all(|&b| b == 0));
    assert!(img[512 * 1024..MIB as usize].iter().all(|&b| b == 0xab));
    assert!(img[8 * MIB as usize..8 * MIB as usize + 4096]
        .iter()
        .all(|&b| b == 0x11));
}

#[test]
fn qemu_img_convert_and_nbdcopy_then_cmp() {
    require_tool("qemu-img");
    require_tool("nbdcopy");
    let node = TestNode::start(&[VolumeSpec::new("db", 32 * MIB)]);
    let src = node.dir.path().join("random.raw");
    random_file(&src, 32 * MIB as usize, 42);
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(node.uri()),
    );
    run_ok(Command::new("cmp").arg(&src).arg(node.image()));
    // qemu-img compare reads it back over NBD.
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(node.uri()),
    );

    // nbdcopy uses 4 connections (multi-conn) with 64 requests each.
    let src2 = node.dir.path().join("random2.raw");
    random_file(&src2, 32 * MIB as usize, 7);
    run_ok(Command::new("nbdcopy").arg(&src2).arg(node.uri()));
    run_ok(Command::new("cmp").arg(&src2).arg(node.image()));
    // And back out again.
    let back = node.dir.path().join("back.raw");
    run_ok(Command::new("nbdcopy").arg(node.uri()).arg(&back));
    run_ok(Command::new("cmp").arg(&src2).arg(&back));
}

#[test]
fn fio_random_writes_with_verify() {
    require_tool("fio");
    let node = TestNode::start(&[VolumeSpec::new("db", 64 * MIB)]);
    let out = run_ok(Command::new("fio").args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={}", node.uri()),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        "--size=32M",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--do_verify=1",
        "--output-format=json",
    ]));
    let v: serde_json::Value = serde_json::from_str(out.trim_start_matches(|c| c != '{')).unwrap();
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "{out}");
    assert!(job["write"]["io_bytes"].as_u64().unwrap() >= 32 * MIB);
    assert!(
        job["read"]["io_bytes"].as_u64().unwrap() >= 32 * MIB,
        "verify read everything back"
    );
}

#[test]
fn concurrent_connections_on_disjoint_ranges() {
    require_tool("qemu-io");
    let node = TestNode::start(&[VolumeSpec::new("db", 64 * MIB)]);
    let children: Vec<_> = (0..6u64)
        .map(|i| {
            let off = i * 8 * MIB;
            Command::new("qemu-io")
                .args(["-f", "raw", "-c"])
                .arg(format!("write -P {} {off} 8M", i + 1))
                .arg(node.uri())
                .output()
        })
        .collect::<Vec<_>>();
    // Command::output runs them one after another; spawn for real concurrency too.
    for c in children {
        assert!(c.unwrap().status.success());
    }
    let procs: Vec<_> = (0..6u64)
        .map(|i| {
            let off = i * 8 * MIB + 4096;
            Command::new("qemu-io")
                .args(["-f", "raw", "-c"])
                .arg(format!("write -P {} {off} 4M", 0x40 + i))
                .arg(node.uri())
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut p in procs {
        assert!(p.wait().unwrap().success());
    }
    let img = std::fs::read(node.image()).unwrap();
    for i in 0..6usize {
        let base = i * 8 * MIB as usize;
        assert_eq!(img[base], i as u8 + 1);
        assert!(img[base + 4096..base + 4096 + 4 * MIB as usize]
            .iter()
            .all(|&b| b == 0x40 + i as u8));
        assert!(img[base + 4096 + 4 * MIB as usize..base + 8 * MIB as usize]
            .iter()
            .all(|&b| b == i as u8 + 1));
    }
    assert_eq!(node.status_json()["volumes"][0]["connections"], 0);
}

#[test]
fn read_only_export_refuses_writes_and_keeps_serving_reads() {
    require_tool("qemu-io");
    require_tool("nbdsh");
    let mut spec = VolumeSpec::new("ro", 16 * MIB);
    spec.extra = "read_only = true".into();
    let node = TestNode::start(&[spec]);
    // qemu sees READ_ONLY in the export flags and will not open it for writing.
    let out = run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 1 0 4k", node.uri()]));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("Permission denied"),
        "qemu-io said: {text}"
    );
    // A client that sends the write anyway (libnbd with its own checks off) gets EPERM from the server.
    let script = format!(
        "import errno\nh.set_strict_mode(0)\nh.connect_uri({:?})\n\
         try:\n    h.pwrite(b'x' * 4096, 0)\n    print('WRITE ACCEPTED')\n\
         except nbd.Error as e:\n    print('errno', e.errno)\n\
         print('read', h.pread(4096, 0) == bytes(4096))\n",
        node.uri()
    );
    // nbdsh is `python3 -m nbd`; Debian's python3 has the module whatever python3 PATH finds.
    let out = run_ok(Command::new("/usr/bin/python3").args(["-m", "nbd", "-c", &script]));
    assert!(
        out.contains("errno EPERM") && out.contains("read True"),
        "nbdsh said: {out}"
    );
    // Reads keep being served.
    let out = run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-r",
        "-c",
        "read -P 0 0 64k",
        node.uri(),
    ]));
    assert!(out.contains("read 65536/65536"), "{out}");
    assert!(node
        .metrics()
        .contains("blockmirror_request_errors_total{volume=\"ro\",cmd=\"write\"} 1"));
}

#[test]
fn unix_socket_export() {
    require_tool("qemu-io");
    require_tool("nbdinfo");
    let mut spec = VolumeSpec::new("u", 8 * MIB);
    spec.unix = true;
    let node = TestNode::start(&[spec, VolumeSpec::new("t", 8 * MIB)]);
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x5a 0 1M", node.uri()]));
    let size = run_ok(Command::new("nbdinfo").args(["--size", node.uri()]));
    assert_eq!(size.trim(), (8 * MIB).to_string());
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x5a 0 1M", node.uri()]));
    // The second volume is its own export on TCP.
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0 0 1M", &node.uris[1]]));
}

#[test]
fn status_metrics_and_cli() {
    require_tool("qemu-io");
    let node = TestNode::start(&[VolumeSpec::new("db", 16 * MIB)]);
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write 0 1M",
        "-c",
        "flush",
        node.uri(),
    ]));
    let st = node.status_json();
    let v = &st["volumes"][0];
    assert_eq!(st["node"], "test");
    assert_eq!(v["name"], "db");
    assert_eq!(v["role"], "primary");
    assert_eq!(v["size_bytes"], 16 * MIB);
    assert_eq!(v["mirrors"], serde_json::json!([]));
    // `<volume id>:<current generation>`: a new primary starts a random lineage.
    let (id, gen) = v["generation"].as_str().unwrap().split_once(':').unwrap();
    assert_eq!((id.len(), gen.len()), (32, 16), "{v}");
    assert_ne!(u64::from_str_radix(gen, 16).unwrap(), 0, "{v}");
    assert!(v["generations"].as_str().unwrap().starts_with(gen), "{v}");
    let m = node.metrics();
    assert!(
        m.contains("blockmirror_host_bytes_written_total{volume=\"db\"} 1048576"),
        "{m}"
    );
    // Label order is the encoder's; look for the labels, not one spelling.
    assert!(
        m.lines().any(
            |l| l.starts_with("blockmirror_request_duration_seconds_bucket{")
                && ["volume=\"db\"", "cmd=\"write\"", "le=\"+Inf\""]
                    .iter()
                    .all(|p| l.contains(p))
        ),
        "{m}"
    );
    let flushes = m
        .lines()
        .find_map(|l| l.strip_prefix("blockmirror_requests_total{volume=\"db\",cmd=\"flush\"} "))
        .and_then(|n| n.parse::<u64>().ok())
        .expect("flush counter");
    assert!(flushes >= 1, "{m}");
    let admin = node.admin.to_string();
    let table = run_ok(Command::new(BIN).args(["status", "--admin", &admin]));
    assert!(table.contains("db") && table.contains("primary"), "{table}");
    let json = run_ok(Command::new(BIN).args(["status", "--json", "--admin", &admin]));
    let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(parsed["volumes"][0]["name"], "db");
    // 404 for anything else.
    assert_eq!(http_get(node.admin, "/nope").unwrap().0, 404);
}

#[test]
fn sigterm_finishes_requests_and_persists_metadata() {
    require_tool("qemu-io");
    let mut node = TestNode::start(&[VolumeSpec::new("db", 16 * MIB)]);
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x77 0 2M", node.uri()]));
    let generation = node.status_json()["volumes"][0]["generation"].clone();
    let status = node.stop_with("TERM");
    assert!(status.success(), "exit {status}: {}", node.log());
    assert!(
        node.log().contains("volume closed cleanly"),
        "{}",
        node.log()
    );
    // Restart: same identity, data intact, no unclean-shutdown warning.
    node.spawn();
    assert_eq!(node.status_json()["volumes"][0]["generation"], generation);
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x77 0 2M", node.uri()]));
    assert!(!node.log().contains("not shut down cleanly"));
    // SIGKILL leaves it unclean, and the next start says so.
    node.stop_with("KILL");
    node.spawn();
    wait_for(
        "the unclean-shutdown warning",
        Duration::from_secs(10),
        || node.log().contains("not shut down cleanly").then_some(()),
    );
    let status = node.stop_with("INT");
    assert!(status.success());
}

#[test]
fn bad_config_names_file_key_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("size = \"12XB\"", "volume[0].size"),
        (
            "size = \"1GiB\"\n[[volume.mirror]]\npeer = \"127.0.0.1:7701\"\nmode = \"async\"\nlag_policy = \"drop\"",
            "volume[0].mirror[0].lag_policy",
        ),
        ("size = \"1GiB\"\ncolour = \"blue\"", "colour"),
    ];
    for (i, (extra, expect)) in cases.iter().enumerate() {
        let cfg = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(
            &cfg,
            format!("node = \"n\"\n[[volume]]\nname = \"db\"\npath = \"db.img\"\nrole = \"primary\"\nnbd = \"127.0.0.1:1\"\n{extra}\n"),
        )
        .unwrap();
        let out = run(Command::new(BIN).args(["serve", "--config"]).arg(&cfg));
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("bad{i}.toml")),
            "names the file: {err}"
        );
        assert!(err.contains(expect), "expected {expect:?} in: {err}");
    }
}
