//! A network partition between a primary and its mirror, made with a
//! network namespace and a veth pair: the mirror node runs inside the
//! namespace on its own address, the primary in this one; the link is cut
//! with `ip link set ... down` under a write load and restored.
//!
//! Traffic stays on this machine: the only peer address is inside the
//! namespace, and an `unreachable` route for the test's /30 keeps packets
//! from taking the default route while the veth is down.
//!
//! Needs root and `ip netns`; without them the test says why and passes.
//! Every address used is inside the namespace this test creates.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;

/// A namespace and a veth pair, removed on drop (even when the test fails).
struct Netns {
    ns: String,
    /// The veth end in this (the root) namespace.
    host_if: String,
    /// The veth end inside the namespace.
    ns_if: String,
    host_ip: String,
    ns_ip: String,
    /// The test's /30, e.g. 10.250.7.0/30.
    subnet: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Netns {
    /// Creates the namespace and the link, or says why it cannot.
    fn create() -> Result<Netns, String> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static K: AtomicU32 = AtomicU32::new(0);
        let pid = std::process::id();
        let k = K.fetch_add(1, Ordering::Relaxed);
        // 10.250.N.0/30, N from the pid and a counter: the tests of one run
        // (and, very likely, two runs at once) do not collide.
        let n = (pid * 8 + k) % 250 + 1;
        let tag = format!("{pid}x{k}");
        let me = Netns {
            ns: format!("bmt{tag}"),
            host_if: format!("bmh{tag}"),
            ns_if: format!("bmn{tag}"),
            host_ip: format!("10.250.{n}.1"),
            ns_ip: format!("10.250.{n}.2"),
            subnet: format!("10.250.{n}.0/30"),
        };
        ip(&["netns", "add", &me.ns])?;
        let ns_if = me.ns_if.clone();
        let setup = (|| {
            // A guard first: whatever state the veth is in, traffic for the
            // test's subnet never takes the default route out of this
            // machine (a down link's connected route disappears).
            ip(&["route", "add", "unreachable", &me.subnet, "metric", "4000"])?;
            ip(&[
                "link",
                "add",
                &me.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &ns_if,
            ])?;
            ip(&["link", "set", &ns_if, "netns", &me.ns])?;
            ip(&[
                "addr",
                "add",
                &format!("{}/30", me.host_ip),
                "dev",
                &me.host_if,
            ])?;
            ip(&["link", "set", &me.host_if, "up"])?;
            ip(&["-n", &me.ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                &me.ns,
                "addr",
                "add",
                &format!("{}/30", me.ns_ip),
                "dev",
                &ns_if,
            ])?;
            ip(&["-n", &me.ns, "link", "set", &ns_if, "up"])
        })();
        if let Err(e) = setup {
            drop(me); // removes what was made
            return Err(e);
        }
        Ok(me)
    }

    fn launcher(&self) -> [&str; 3] {
        ["netns", "exec", &self.ns]
    }

    /// Cuts or restores the cable: the mirror's end of the veth pair goes
    /// down, so packets either way are silently lost (no reset, no error).
    fn set_link(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.ns, "link", "set", &self.ns_if, state]).unwrap();
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes both.
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.ns]);
        let _ = ip(&[
            "route",
            "del",
            "unreachable",
            &self.subnet,
            "metric",
            "4000",
        ]);
    }
}

/// A namespace with a mirror node in it and a primary here, in sync; None
/// (after saying why) when namespaces cannot be made.
fn netns_pair() -> Option<(Netns, Pair)> {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if !is_root {
        println!("skipping: network namespaces unavailable (not root)");
        return None;
    }
    let net = match Netns::create() {
        Ok(n) => n,
        Err(e) => {
            println!("skipping: network namespaces unavailable ({e})");
            return None;
        }
    };
    let mut launch = vec!["ip"];
    launch.extend(net.launcher());
    let pair = PairBuilder::new(64 * MIB)
        .mirror_at(&net.ns_ip, &launch)
        .start();
    Some((net, pair))
}

/// For people reading with --nocapture: how the link went down and came back.
fn print_link_log(pair: &Pair) {
    for line in pair.logs().lines().filter(|l| {
        l.contains("blockmirror_node::primary") || l.contains("blockmirror_node::mirror")
    }) {
        println!("{line}");
    }
}

#[test]
fn partition_degrades_then_heals_and_resyncs() {
    require_tool("fio");
    require_tool("qemu-io");
    // The namespace is dropped last: the nodes stop before it goes.
    let Some((net, pair)) = netns_pair() else {
        return;
    };
    let resync_before = pair.primary_metric("blockmirror_resync_bytes_total");

    let mut fio = fio_load(pair.primary.uri(), 6);
    wait_for("replicated writes", Duration::from_secs(20), || {
        (pair.primary_metric("blockmirror_replicated_bytes_total") >= (2 * MIB) as f64)
            .then_some(())
    });
    assert!(fio.try_wait().unwrap().is_none(), "fio ended too soon");

    // Cut the link. Nothing is closed and nothing answers: only the
    // watchdog (mirror_timeout) can notice.
    net.set_link(false);
    let link = pair.wait_link("degraded by the partition", Duration::from_secs(15), |l| {
        l["state"] == "degraded" && l["out_of_sync_bytes"].as_u64().unwrap_or(0) > 0
    });
    assert_ne!(link["connection"], "connected", "{link}");
    let written = pair.primary_metric("blockmirror_host_bytes_written_total");
    wait_for(
        "host writes during the partition",
        Duration::from_secs(10),
        || {
            (pair.primary_metric("blockmirror_host_bytes_written_total") >= written + MIB as f64)
                .then_some(())
        },
    );
    assert!(
        fio.try_wait().unwrap().is_none(),
        "fio ended before writes were seen during the partition"
    );
    let out = fio.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("err= 0"),
        "fio:\n{text}"
    );

    // Heal: reconnect, catch up, identical.
    net.set_link(true);
    pair.wait_in_sync(Duration::from_secs(60));
    assert!(pair.primary_metric("blockmirror_link_reconnects_total") >= 1.0);
    assert!(pair.primary_metric("blockmirror_resync_bytes_total") > resync_before);
    pair.flush_primary();
    pair.assert_images_identical();
    print_link_log(&pair);
    drop(pair);
    drop(net);
}

/// The number of lines of `log` that contain `what`.
fn count(log: &str, what: &str) -> usize {
    log.lines().filter(|l| l.contains(what)).count()
}

#[test]
fn idle_partition_is_noticed_without_writes() {
    require_tool("qemu-io");
    let Some((net, pair)) = netns_pair() else {
        return;
    };
    // The scenario needs an idle link: no request for 3 s in a row (this
    // is the scenario's idle period, not a wait for a state).
    let quiet = Duration::from_secs(3);
    let mut last = (
        pair.primary_metric("blockmirror_replicated_requests_total"),
        Instant::now(),
    );
    wait_for("an idle link", Duration::from_secs(30), || {
        let n = pair.primary_metric("blockmirror_replicated_requests_total");
        if n != last.0 {
            last = (n, Instant::now());
        }
        (last.1.elapsed() >= quiet).then_some(())
    });
    net.set_link(false);
    // No host I/O at all: only the link itself (a heartbeat, keepalive) can
    // notice. The status must stop claiming "connected" within a few
    // mirror timeouts (1s here).
    let link = pair.wait_link("noticed as away", Duration::from_secs(15), |l| {
        l["connection"] != "connected"
    });
    assert_ne!(link["state"], "in_sync", "{link}");
    net.set_link(true);
    pair.wait_in_sync(Duration::from_secs(60));
    print_link_log(&pair);
    drop(pair);
    drop(net);
}

#[test]
fn partition_that_outlives_the_old_connection_heals() {
    require_tool("qemu-io");
    let Some((net, pair)) = netns_pair() else {
        return;
    };
    // Cut the cable while the link is idle: the mirror has nothing to send,
    // so its side of the connection will never notice.
    net.set_link(false);
    // A host write: the mirror never gets it, the watchdog fails the link
    // after mirror_timeout, the write succeeds (degrade), and the primary
    // closes its socket (its FIN is lost in the partition).
    let out = run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x33 0 64k",
        pair.primary.uri(),
    ]));
    assert!(!out.contains("failed"), "{out}");
    pair.wait_link("degraded", Duration::from_secs(10), |l| {
        l["state"] == "degraded"
    });
    // The primary's kernel forgets the closed connection, as it does by
    // itself once its FIN retries run out (net.ipv4.tcp_orphan_retries,
    // about two minutes) or when the primary's host restarts during the
    // partition. `ss -K` does it now, for this test's connection only.
    let port = pair.mirror_listen.port().to_string();
    let out = run(Command::new("ss").args(["-K", "dst", &net.ns_ip, "dport", "=", &port]));
    assert!(out.status.success(), "ss -K: {out:?}");
    // ss -K sends a reset; it must be lost in the partition like everything
    // else, not delivered once the cable is back. It waits in the neighbour
    // queue until address resolution fails, which then drops it.
    wait_for("the reset to be dropped", Duration::from_secs(20), || {
        let out =
            run(Command::new("ip").args(["neigh", "show", "to", &net.ns_ip, "dev", &net.host_if]));
        let s = String::from_utf8_lossy(&out.stdout).to_string();
        s.contains("FAILED").then_some(())
    });
    net.set_link(true);
    // A broken link must end in a resync (DESIGN: nothing silently lost,
    // "a broken link ... ends in a resync of exactly those blocks").
    let healed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        pair.wait_in_sync(Duration::from_secs(30))
    }));
    print_link_log(&pair);
    let mlog = pair.mirror.log();
    assert!(
        healed.is_ok(),
        "the link never healed; the mirror refused the primary {} times as already fed",
        count(&mlog, "already fed")
    );
    pair.flush_primary();
    pair.assert_images_identical();
    drop(pair);
    drop(net);
}

/// Runs `blockmirror ARGS` inside the namespace (the mirror's admin address
/// is only reachable from there while the cable is cut).
fn in_ns(net: &Netns, cmd: &str, args: &[&str]) -> std::process::Output {
    run(Command::new("ip")
        .args(["netns", "exec", &net.ns, cmd])
        .args(args))
}

/// Failover across a real partition, then failback when it heals: the
/// mirror notices the silence of its primary (no FIN ever arrives), is
/// promoted without --force and written; when the cable is back, the old
/// primary (which did not write meanwhile) finds it promoted, demotes
/// itself, and gets what was written; the images end identical.
#[test]
fn partition_failover_then_failback_when_it_heals() {
    require_tool("qemu-io");
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if !is_root {
        println!("skipping: network namespaces unavailable (not root)");
        return;
    }
    let net = match Netns::create() {
        Ok(n) => n,
        Err(e) => {
            println!("skipping: network namespaces unavailable ({e})");
            return;
        }
    };
    let mut launch = vec!["ip"];
    launch.extend(net.launcher());
    let pair = PairBuilder::new(32 * MIB)
        .mirror_at(&net.ns_ip, &launch)
        .symmetric_at(&net.host_ip)
        .start();
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x11 0 4M",
        "-c",
        "flush",
        pair.primary.uri(),
    ]));
    let m_admin = pair.mirror.admin.to_string();
    let mirror_status = || -> serde_json::Value {
        let out = in_ns(&net, BIN, &["status", "--admin", &m_admin, "--json"]);
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    };
    net.set_link(false);
    // No FIN crosses the cut: the mirror must notice the silence itself.
    wait_for(
        "the mirror to give its silent primary up",
        Duration::from_secs(40),
        || {
            let v = mirror_status()["volumes"][0].clone();
            (v.is_object() && v.get("primary").is_none()).then_some(())
        },
    );
    let out = in_ns(&net, BIN, &["promote", PAIR_VOLUME, "--admin", &m_admin]);
    assert!(
        out.status.success(),
        "promote: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = in_ns(
        &net,
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x22 8M 2M",
            "-c",
            "flush",
            pair.mirror.uri(),
        ],
    );
    assert!(
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("failed"),
        "write on the promoted mirror: {out:?}"
    );
    net.set_link(true);
    wait_for(
        "the old primary to demote itself",
        Duration::from_secs(40),
        || (pair.primary.status_json()["volumes"][0]["role"] == "mirror").then_some(()),
    );
    wait_for("the failback", Duration::from_secs(60), || {
        let l = pair.mirror.status_json()["volumes"][0]["mirrors"][0].clone();
        (l["connection"] == "connected" && l["state"] == "in_sync" && l["out_of_sync_bytes"] == 0)
            .then_some(())
    });
    let sent = metric(&pair.mirror.metrics(), "blockmirror_resync_bytes_total").unwrap_or(0.0);
    assert!(
        sent >= (2 * MIB) as f64 && sent < (32 * MIB) as f64,
        "the failback sends what was written, not the volume: {sent}"
    );
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "flush", pair.mirror.uri()]));
    pair.assert_images_identical();
    print_link_log(&pair);
    drop(pair);
    drop(net);
}
