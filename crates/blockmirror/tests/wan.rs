//! Mirroring over a WAN stand-in: testkit's delay proxy (one-way delay,
//! bandwidth limit, cut and heal) between the primary and its mirror, since
//! this kernel has no netem.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use blockmirror_testkit::delay::Shape;
use common::*;

const MIB: u64 = 1 << 20;

#[test]
fn sync_writes_wait_for_the_round_trip_and_a_cut_link_heals() {
    require_tool("qemu-io");
    let pair = PairBuilder::new(16 * MIB)
        .through_delay(Shape {
            delay: Duration::from_millis(10),
            rate: Some(64 << 20),
        })
        .mirror_timeout("2s")
        .start();

    // Ten sequential sync writes: each waits at least one round trip (20 ms).
    let mut cmds = Vec::new();
    for i in 0..10 {
        cmds.push("-c".to_string());
        cmds.push(format!("write -P 0x{:02x} {} 4k", 0x40 + i, i * 4096));
    }
    let t = Instant::now();
    let out = run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw"])
            .args(&cmds)
            .arg(pair.primary.uri()),
    );
    let took = t.elapsed();
    assert!(!out.contains("failed"), "{out}");
    assert!(
        took >= Duration::from_millis(200),
        "10 sync writes over a 20 ms round trip took only {took:?}"
    );

    // Partition: the link fails (watchdog or reset), host writes go on.
    pair.proxy.as_ref().unwrap().cut();
    pair.wait_link("degraded", Duration::from_secs(20), |l| {
        l["state"] == "degraded"
    });
    let out = run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x77 1M 2M",
        pair.primary.uri(),
    ]));
    assert!(!out.contains("failed"), "{out}");
    let link = pair.link();
    assert!(
        link["out_of_sync_bytes"].as_u64().unwrap() >= 2 * MIB,
        "{link}"
    );

    // Heal: it reconnects, copies what it missed, and is in sync again.
    pair.proxy.as_ref().unwrap().heal();
    pair.wait_in_sync(Duration::from_secs(30));
    pair.flush_primary();
    pair.assert_images_identical();
}
