//! The mirror's parallel apply engine end to end (seed 003): a sync mirror
//! whose backend is opened O_DIRECT (so every operation goes to one of many
//! apply tasks rather than inline), driven by fio with mixed sizes,
//! overlapping rewrites and trims at once. The images must be identical
//! after a flush, and fio's own verification must pass.

mod common;

use std::process::Command;

use common::*;

const MIB: u64 = 1 << 20;

#[test]
fn fio_mixed_load_through_parallel_apply_leaves_identical_images() {
    require_tool("fio");
    require_tool("qemu-io");
    let pair = PairBuilder::new(64 * MIB)
        .mirror_volume("direct_io = true\napply_groups = 4\napply_tasks_per_group = 4")
        .start();
    let uri = format!("--uri={}", pair.primary.uri());
    let out = run_ok(Command::new("fio").args([
        "--ioengine=nbd",
        // Verified random writes of mixed sizes over the first half.
        "--name=verified",
        &uri,
        "--rw=randwrite",
        "--bssplit=4k/50:64k/30:1m/20",
        "--iodepth=32",
        "--size=32M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_state_save=0",
        "--randrepeat=0",
        // Over the second half: random rewrites of the same blocks
        // (norandommap: blocks are hit again while earlier writes to them
        // may still be applying on the mirror) and trims, at once.
        "--name=rewrite",
        &uri,
        "--rw=randwrite",
        "--bssplit=4k/60:16k/30:256k/10",
        "--norandommap",
        "--iodepth=32",
        "--offset=32M",
        "--size=32M",
        "--number_ios=4000",
        "--randrepeat=0",
        "--name=trim",
        &uri,
        "--rw=randtrim",
        "--bs=64k",
        "--norandommap",
        "--iodepth=8",
        "--offset=32M",
        "--size=32M",
        "--number_ios=300",
        "--randrepeat=0",
    ]));
    assert!(out.contains("err= 0"), "{out}");
    assert!(!out.contains("verify:"), "fio verification failed:\n{out}");
    pair.flush_primary();
    pair.assert_images_identical();

    // The mirror really used its tasks: every operation went to a worker
    // (O_DIRECT is not a fast backend, so nothing ran inline).
    let m = pair.mirror.metrics();
    let ops = metric(&m, "blockmirror_apply_ops_total").unwrap_or(0.0);
    let inline = metric(&m, "blockmirror_apply_inline_ops_total").unwrap_or(-1.0);
    assert!(ops >= 1000.0, "apply ops {ops}\n{m}");
    assert_eq!(inline, 0.0, "{m}");
    assert!(
        m.contains("blockmirror_apply_group_queue_depth{volume=\"vol\",group=\"3\"}"),
        "four groups exported:\n{m}"
    );
    let link = pair.link();
    assert_eq!(link["state"], "in_sync", "{link}");
    assert_eq!(link["out_of_sync_bytes"], 0, "{link}");
}

#[test]
fn bad_apply_config_is_refused_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("node.toml");
    std::fs::write(
        &cfg,
        "node = \"m\"\nlisten = \"127.0.0.1:1\"\nsecret_file = \"s\"\n[[volume]]\nname = \"v\"\n\
         path = \"v.img\"\nsize = \"1MiB\"\nrole = \"mirror\"\nnbd = \"127.0.0.1:2\"\napply_groups = 0\n",
    )
    .unwrap();
    let out = run(Command::new(BIN).args(["serve", "--config"]).arg(&cfg));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("volume[0].apply_groups") && err.contains("out of range"),
        "{err}"
    );
}
