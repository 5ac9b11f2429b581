//! Cluster mode on etcd (issue 17), with real processes: a 3-member etcd on
//! loopback and three `blockmirror serve` nodes, each configured with the
//! other two as its volume's mirrors, so that whichever is primary mirrors
//! to the rest.
//!
//! - failover: the primary is frozen (SIGSTOP: to the rest of the world a
//!   partitioned node; its lease lapses). Exactly one mirror takes the next
//!   epoch and is promoted; every acknowledged sync write is on it. The old
//!   primary, thawed, acknowledges nothing more (its lease is not trusted),
//!   finds the newer epoch, steps down, and is resynced to a byte-identical
//!   copy.
//! - etcd quorum lost: the primary stops acknowledging writes within the
//!   lease and nobody is promoted; quorum back, it serves again at a new
//!   epoch.
//!
//! Needs the `etcd` binary (scripts/install-deps.sh installs etcd-server);
//! without it the tests say so and pass.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use blockmirror_testkit::etcd::{EtcdCluster, EtcdOpts};
use common::*;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const VOL: &str = "vol";

struct Site {
    name: String,
    node: TestNode,
    nbd: String,
    image: PathBuf,
}

/// Three nodes a, b, c; `a` starts as the primary.
struct Cluster {
    sites: Vec<Site>,
    etcd: EtcdCluster,
    _dir: tempfile::TempDir,
}

fn start_cluster(ttl: &str) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdCluster::start(EtcdOpts::new(dir.path().join("etcd"), 3)).unwrap();
    let endpoints = etcd
        .endpoints()
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let secret = new_secret();
    let names = ["a", "b", "c"];
    let listen: Vec<SocketAddr> = names
        .iter()
        .map(|_| format!("127.0.0.1:{}", free_port()).parse().unwrap())
        .collect();
    let mut sites = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let ndir = tempfile::tempdir().unwrap();
        std::fs::write(ndir.path().join("secret.key"), format!("{secret}\n")).unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let nbd = format!("127.0.0.1:{}", free_port());
        let image = ndir.path().join(format!("{VOL}.img"));
        let role = if i == 0 { "primary" } else { "mirror" };
        let mirrors: String = listen
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, l)| format!("[[volume.mirror]]\npeer = \"{l}\"\n"))
            .collect();
        let text = format!(
            "node = \"{name}\"\nlisten = \"{}\"\nadmin = \"{admin}\"\nsecret_file = \"secret.key\"\n\
             [cluster]\netcd = [{endpoints}]\nlease_ttl = \"{ttl}\"\nsite = \"site-{name}\"\n\
             [[volume]]\nname = \"{VOL}\"\npath = \"{}\"\nsize = {SIZE}\nrole = \"{role}\"\nnbd = \"{nbd}\"\n\
             mirror_timeout = \"2s\"\n{mirrors}",
            listen[i],
            image.display(),
        );
        let node = TestNode::from_config(
            ndir,
            &text,
            admin,
            vec![format!("nbd://{nbd}/{VOL}")],
            vec![image.clone()],
            Vec::new(),
        );
        sites.push(Site {
            name: name.to_string(),
            node,
            nbd: format!("nbd://{nbd}/{VOL}"),
            image,
        });
    }
    Cluster {
        sites,
        etcd,
        _dir: dir,
    }
}

fn volume(s: &Site) -> serde_json::Value {
    s.node.status_json()["volumes"][0].clone()
}

/// Waits until `s` is primary at some epoch with every mirror in sync.
fn wait_primary_in_sync(s: &Site, min_epoch: u64, timeout: Duration) -> u64 {
    wait_for(
        &format!("{} primary, mirrors in sync", s.name),
        timeout,
        || {
            let v = volume(s);
            let epoch = v["epoch"].as_u64()?;
            let mirrors = v["mirrors"].as_array()?;
            (v["role"] == "primary"
                && epoch >= min_epoch
                && !mirrors.is_empty()
                && mirrors.iter().all(|m| m["state"] == "in_sync"))
            .then_some(epoch)
        },
    )
}

fn signal(s: &Site, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &s.node.pid().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {}", s.name);
}

/// Whether qemu-io's command failed (it may exit 0 and say "failed").
fn refused(uri: &str, cmd: &str) -> bool {
    let o = qemu_io(uri, &[cmd]);
    let out = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    !o.status.success() || out.contains("failed")
}

#[test]
fn the_lost_primary_is_replaced_by_one_mirror_and_rejoins_as_its_mirror() {
    if !have_etcd() {
        eprintln!("SKIP: no etcd binary (install etcd-server: scripts/install-deps.sh)");
        return;
    }
    require_tool("qemu-io");
    let mut c = start_cluster("2s");
    let e1 = wait_primary_in_sync(&c.sites[0], 1, Duration::from_secs(60));
    // Acknowledged sync writes: they must survive the failover.
    qemu_io_ok(&c.sites[0].nbd, &["write -P 0xab 0 8M", "flush"]);

    // The primary vanishes (frozen: a partition, as the rest sees it).
    signal(&c.sites[0], "STOP");
    let lost = Instant::now();
    let (new, e2) = wait_for("one mirror promoted", Duration::from_secs(30), || {
        c.sites[1..].iter().enumerate().find_map(|(i, s)| {
            let v = volume(s);
            (v["role"] == "primary").then(|| (i + 1, v["epoch"].as_u64().unwrap_or(0)))
        })
    });
    assert!(e2 > e1, "the new primary's epoch {e2} is newer than {e1}");
    let other = if new == 1 { 2 } else { 1 };
    assert_eq!(
        volume(&c.sites[other])["role"],
        "mirror",
        "exactly one primary"
    );
    // The first write the new primary acknowledges.
    let uri = c.sites[new].nbd.clone();
    wait_for(
        "a write acknowledged by the new primary",
        Duration::from_secs(20),
        || (!refused(&uri, "write -P 0xcd 8M 1M")).then_some(()),
    );
    eprintln!(
        "failover: {} ms from the primary's loss to the first write acknowledged by {} (lease_ttl 2s)",
        lost.elapsed().as_millis(),
        c.sites[new].name
    );
    // Nothing acknowledged was lost.
    qemu_io_ok(&uri, &["read -P 0xab 0 8M", "read -P 0xcd 8M 1M"]);
    // What the coordinator says, as an operator sees it.
    let endpoints = c.etcd.endpoints().join(",");
    let out = run_ok(
        Command::new(env!("CARGO_BIN_EXE_blockmirror"))
            .args(["cluster", "status", "--etcd", &endpoints, "--json"]),
    );
    let view: serde_json::Value = serde_json::from_str(&out).unwrap();
    let v = &view["volumes"][0];
    assert_eq!(v["volume"], VOL, "{out}");
    assert_eq!(v["primary"], c.sites[new].name.as_str(), "{out}");
    assert_eq!(v["epoch"].as_u64(), Some(e2), "{out}");

    // The old primary thaws: its lease is not trusted any more, so it
    // acknowledges no write; it learns the newer epoch and steps down.
    signal(&c.sites[0], "CONT");
    assert!(
        refused(&c.sites[0].nbd, "write -P 0xee 0 64k"),
        "the deposed primary acknowledged a write"
    );
    wait_for(
        "the old primary steps down",
        Duration::from_secs(30),
        || {
            let v = volume(&c.sites[0]);
            (v["role"] == "mirror" && v["epoch"].as_u64() == Some(e2)).then_some(())
        },
    );
    assert!(
        c.sites[0].node.log().contains("demoting here"),
        "{}",
        c.sites[0].node.log()
    );
    // Resynced by the new primary: every mirror in sync, images identical.
    wait_primary_in_sync(&c.sites[new], e2, Duration::from_secs(60));
    qemu_io_ok(&uri, &["flush"]);
    let status = c.sites[new].node.status_json();
    assert_eq!(status["cluster"]["lease_ok"], true, "{status}");
    for s in c.sites.iter_mut() {
        s.node.stop_with("TERM");
    }
    let want = std::fs::read(&c.sites[new].image).unwrap();
    for s in &c.sites {
        assert!(
            std::fs::read(&s.image).unwrap() == want,
            "{}'s image differs from the new primary's",
            s.name
        );
    }
    drop(c);
}

#[test]
fn without_etcd_quorum_the_primary_stops_acknowledging_and_nobody_is_promoted() {
    if !have_etcd() {
        eprintln!("SKIP: no etcd binary (install etcd-server: scripts/install-deps.sh)");
        return;
    }
    require_tool("qemu-io");
    let mut c = start_cluster("2s");
    let e1 = wait_primary_in_sync(&c.sites[0], 1, Duration::from_secs(60));
    qemu_io_ok(&c.sites[0].nbd, &["write -P 0x11 0 1M"]);
    // One member lost: nothing changes.
    c.etcd.kill(2);
    assert!(!refused(&c.sites[0].nbd, "write -P 0x12 1M 1M"));
    assert_eq!(volume(&c.sites[0])["epoch"].as_u64(), Some(e1));
    // Quorum lost: within the lease the primary stops acknowledging.
    c.etcd.kill(1);
    let uri = c.sites[0].nbd.clone();
    wait_for("the primary fences itself", Duration::from_secs(15), || {
        refused(&uri, "write -P 0x13 2M 64k").then_some(())
    });
    assert_eq!(c.sites[0].node.status_json()["cluster"]["lease_ok"], false);
    for s in &c.sites[1..] {
        assert_eq!(
            volume(s)["role"],
            "mirror",
            "{} was promoted without etcd",
            s.name
        );
    }
    // Quorum back: the same node serves again (its key lapsed with its
    // lease: it takes it again at a newer epoch).
    c.etcd.restart(1).unwrap();
    c.etcd.restart(2).unwrap();
    c.etcd.wait_healthy(Duration::from_secs(30)).unwrap();
    wait_for("the primary serves again", Duration::from_secs(30), || {
        (!refused(&uri, "write -P 0x14 3M 64k")).then_some(())
    });
    let v = volume(&c.sites[0]);
    assert_eq!(v["role"], "primary");
    for s in &c.sites[1..] {
        assert_eq!(volume(s)["role"], "mirror");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for s in &self.sites {
                let log = s.node.log();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("--- node {} (last lines) ---", s.name);
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

/// `demo --cluster` as a new user runs it: three sites and etcd come up,
/// the printed primary takes a write, `cluster status` names it, Ctrl-C
/// stops everything.
#[test]
fn demo_cluster_runs_three_sites_on_etcd() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    if !have_etcd() {
        eprintln!("SKIP: no etcd binary (install etcd-server: scripts/install-deps.sh)");
        return;
    }
    require_tool("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_blockmirror"))
        .args(["demo", "--cluster", "--size", "64MiB", "--dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut primary_uri, mut etcd) = (None, None);
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line.starts_with("  etcd ") {
            etcd = line.split_whitespace().nth(1).map(str::to_owned);
        }
        if line.ends_with("<- primary") {
            primary_uri = line.split_whitespace().nth(2).map(str::to_owned);
        }
        if line.starts_with("Press Ctrl-C") {
            break;
        }
    }
    let (uri, etcd) = (primary_uri.expect("a primary"), etcd.expect("etcd"));
    qemu_io_ok(&uri, &["write -P 0x5a 0 1M", "flush"]);
    let out = run_ok(
        Command::new(env!("CARGO_BIN_EXE_blockmirror"))
            .args(["cluster", "status", "--etcd", &etcd]),
    );
    assert!(out.contains("site-a") && out.contains("demo"), "{out}");
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(child.wait().unwrap().success(), "{rest:?}");
    assert!(rest.iter().any(|l| l == "stopped"), "{rest:?}");
}

/// A consistency group fails over as one: two volumes in group `g` on each
/// of three nodes; the primary lost, one node takes the group's key and
/// promotes both volumes, at one epoch.
#[test]
fn a_consistency_group_fails_over_as_one() {
    if !have_etcd() {
        eprintln!("SKIP: no etcd binary (install etcd-server: scripts/install-deps.sh)");
        return;
    }
    require_tool("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdCluster::start(EtcdOpts::new(dir.path().join("etcd"), 3)).unwrap();
    let endpoints = etcd
        .endpoints()
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let secret = new_secret();
    let listen: Vec<SocketAddr> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port()).parse().unwrap())
        .collect();
    let mut nodes = Vec::new();
    let mut uris: Vec<Vec<String>> = Vec::new();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        let ndir = tempfile::tempdir().unwrap();
        std::fs::write(ndir.path().join("secret.key"), format!("{secret}\n")).unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let role = if i == 0 { "primary" } else { "mirror" };
        let mut text = format!(
            "node = \"{name}\"\nlisten = \"{}\"\nadmin = \"{admin}\"\nsecret_file = \"secret.key\"\n\
             [cluster]\netcd = [{endpoints}]\nlease_ttl = \"2s\"\n",
            listen[i]
        );
        let mut mine = Vec::new();
        for vol in ["v1", "v2"] {
            let nbd = format!("127.0.0.1:{}", free_port());
            text += &format!(
                "[[volume]]\nname = \"{vol}\"\npath = \"{vol}.img\"\nsize = {}\nrole = \"{role}\"\n\
                 nbd = \"{nbd}\"\nconsistency_group = \"g\"\nmirror_timeout = \"2s\"\n",
                16 * MIB
            );
            for (j, l) in listen.iter().enumerate() {
                if j != i {
                    text += &format!("[[volume.mirror]]\npeer = \"{l}\"\n");
                }
            }
            mine.push(format!("nbd://{nbd}/{vol}"));
        }
        let images = vec![ndir.path().join("v1.img"), ndir.path().join("v2.img")];
        nodes.push(TestNode::from_config(
            ndir,
            &text,
            admin,
            mine.clone(),
            images,
            Vec::new(),
        ));
        uris.push(mine);
    }
    let vols = |n: &TestNode| n.status_json()["volumes"].as_array().unwrap().clone();
    wait_for(
        "a primary of both, in sync",
        Duration::from_secs(60),
        || {
            let v = vols(&nodes[0]);
            v.iter()
                .all(|v| {
                    v["role"] == "primary"
                        && v["epoch"].as_u64() >= Some(1)
                        && v["mirrors"]
                            .as_array()
                            .is_some_and(|m| m.iter().all(|m| m["state"] == "in_sync"))
                })
                .then_some(())
        },
    );
    qemu_io_ok(&uris[0][0], &["write -P 0x61 0 1M"]);
    qemu_io_ok(&uris[0][1], &["write -P 0x62 0 1M"]);
    let pid = nodes[0].pid().to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    let new = wait_for(
        "the group promoted on one node",
        Duration::from_secs(30),
        || (1..3).find(|&i| vols(&nodes[i]).iter().all(|v| v["role"] == "primary")),
    );
    let other = 3 - new;
    let promoted = vols(&nodes[new]);
    assert_eq!(
        promoted[0]["epoch"], promoted[1]["epoch"],
        "one epoch for the group"
    );
    assert!(
        vols(&nodes[other]).iter().all(|v| v["role"] == "mirror"),
        "exactly one primary of the group"
    );
    qemu_io_ok(&uris[new][0], &["read -P 0x61 0 1M"]);
    qemu_io_ok(&uris[new][1], &["read -P 0x62 0 1M"]);
    // One record for the group, none per volume.
    let endpoints = etcd.endpoints().join(",");
    let out = run_ok(
        Command::new(env!("CARGO_BIN_EXE_blockmirror"))
            .args(["cluster", "status", "--etcd", &endpoints, "--json"]),
    );
    let view: serde_json::Value = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = view["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["volume"].as_str())
        .collect();
    assert_eq!(names, ["group:g"], "{out}");
    assert!(Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());
    wait_for(
        "the old primary steps down on both",
        Duration::from_secs(30),
        || {
            vols(&nodes[0])
                .iter()
                .all(|v| v["role"] == "mirror")
                .then_some(())
        },
    );
}
