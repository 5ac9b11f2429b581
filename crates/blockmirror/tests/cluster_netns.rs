//! Cluster mode across a real partition: three sites in network namespaces
//! (veth pairs on one bridge, testkit's `Sites`), one etcd member and one
//! `blockmirror serve` node per site, each node configured with the other
//! two as its volume's mirrors (the layout of `tests/cluster.rs`). Every
//! address a node or member binds is its site's IP; the root namespace
//! (this test) reaches them through the bridge.
//!
//! - partition: the history writer runs *in the primary's site* (a host
//!   beside the primary, so it keeps talking to it when the site is cut
//!   off). The site's link goes down: the primary, reaching only its own
//!   etcd member (no quorum), loses its lease and refuses every write from
//!   then on (its late writes: EIO, never acknowledged); exactly one of
//!   the two other sites takes the next epoch and is promoted; the history
//!   checker finds every write the old primary ever acknowledged on it.
//!   Healed, the old primary finds the newer epoch, steps down, is resynced
//!   (the divergence, not the volume) and all three images end identical.
//! - etcd: one member lost changes nothing; quorum lost, the primary stops
//!   acknowledging within the lease and nobody is promoted (never two
//!   primaries); quorum back, the primary serves again.
//!
//! Needs root, `ip netns` and the `etcd` binary; without them the tests say
//! which is missing and pass. Nothing leaves this machine: the sites' /24
//! is claimed by an `unreachable` route (see testkit's `netns`).

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use blockmirror_testkit::etcd::{EtcdCluster, EtcdOpts, MemberSpec};
use blockmirror_testkit::history::{self, Require};
use blockmirror_testkit::netns::Sites;
use blockmirror_testkit::writer::{self, Progress, WriterConfig};
use common::*;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const VOL: &str = "vol";
const TTL: Duration = Duration::from_secs(2);
/// The history writer's blocks: the first 16 MiB.
const HISTORY_BLOCKS: u64 = 16 * MIB / 4096;

/// The two tests each run three etcd members and three nodes; on a small
/// machine at once they would starve each other's 2 s leases.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The sites, or why this machine cannot make them (the test then passes).
fn sites_or_skip() -> Option<Sites> {
    if !have_etcd() {
        eprintln!("SKIP: no etcd binary (install etcd-server: scripts/install-deps.sh)");
        return None;
    }
    match Sites::create(3) {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("SKIP: cannot make network namespaces ({e}); run as root with `ip netns`");
            None
        }
    }
}

struct Node {
    name: String,
    node: TestNode,
    admin: SocketAddr,
    nbd: String,
    image: PathBuf,
}

/// Three sites a, b, c: etcd member i and node i in site i; `a` starts as
/// the primary. Dropped in field order: nodes first, then etcd, then the
/// namespaces.
struct Cluster {
    nodes: Vec<Node>,
    etcd: EtcdCluster,
    _dir: tempfile::TempDir,
    sites: Sites,
}

fn start_cluster(sites: Sites) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let members = (0..3)
        .map(|i| MemberSpec::new(sites.ip(i), sites.launcher(i)))
        .collect();
    let etcd = EtcdCluster::start(EtcdOpts::with_members(dir.path().join("etcd"), members))
        .expect("etcd in the sites");
    let endpoints = etcd
        .endpoints()
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let secret = new_secret();
    let names = ["a", "b", "c"];
    let listen: Vec<SocketAddr> = (0..3)
        .map(|i| format!("{}:{}", sites.ip(i), free_port()).parse().unwrap())
        .collect();
    let mut nodes = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let ndir = tempfile::tempdir().unwrap();
        std::fs::write(ndir.path().join("secret.key"), format!("{secret}\n")).unwrap();
        let admin: SocketAddr = format!("{}:{}", sites.ip(i), free_port()).parse().unwrap();
        let nbd = format!("{}:{}", sites.ip(i), free_port());
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
             [cluster]\netcd = [{endpoints}]\nlease_ttl = \"{}s\"\nsite = \"site-{name}\"\n\
             [[volume]]\nname = \"{VOL}\"\npath = \"{}\"\nsize = {SIZE}\nrole = \"{role}\"\nnbd = \"{nbd}\"\n\
             mirror_timeout = \"1s\"\n{mirrors}",
            listen[i],
            TTL.as_secs(),
            image.display(),
        );
        let uri = format!("nbd://{nbd}/{VOL}");
        let node = TestNode::from_config(
            ndir,
            &text,
            admin,
            vec![uri.clone()],
            vec![image.clone()],
            sites.launcher(i),
        );
        nodes.push(Node {
            name: name.to_string(),
            node,
            admin,
            nbd: uri,
            image,
        });
    }
    Cluster {
        nodes,
        etcd,
        _dir: dir,
        sites,
    }
}

impl Cluster {
    /// Node `i`'s /status, asked from inside its site (works while the
    /// site is cut off), or None if it does not answer.
    fn status_in_site(&self, i: usize) -> Option<serde_json::Value> {
        let admin = self.nodes[i].admin;
        let (code, body) = self
            .sites
            .in_ns(i, || http_get(admin, "/status"))
            .ok()?
            .ok()?;
        (code == 200).then(|| serde_json::from_str(&body).ok())?
    }

    /// Node `i`'s volume, from its site.
    fn volume(&self, i: usize) -> serde_json::Value {
        let st = self
            .status_in_site(i)
            .unwrap_or_else(|| panic!("node {} does not answer /status", self.nodes[i].name));
        st["volumes"][0].clone()
    }

    /// Runs qemu-io with `cmds` against node `i`'s export from inside its
    /// site; whether every command succeeded (it may exit 0 and say
    /// "failed").
    fn qemu_io_in_site(&self, i: usize, cmds: &[&str]) -> (bool, String) {
        let mut c = self.sites.command(i, "qemu-io");
        c.args(["-f", "raw"]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        let o = run(c.arg(&self.nodes[i].nbd));
        let out =
            String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
        (o.status.success() && !out.contains("failed"), out)
    }

    fn roles(&self) -> Vec<String> {
        (0..self.nodes.len())
            .map(|i| {
                self.status_in_site(i)
                    .map(|s| s["volumes"][0]["role"].as_str().unwrap_or("?").to_string())
                    .unwrap_or_else(|| "unreachable".into())
            })
            .collect()
    }

    fn all_logs(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            out += &format!("===== node {} =====\n{}", n.name, n.node.all_logs());
        }
        out
    }
}

/// Waits until node `i` is primary at `min_epoch` or later with every
/// mirror in sync; returns the epoch.
fn wait_primary_in_sync(c: &Cluster, i: usize, min_epoch: u64, timeout: Duration) -> u64 {
    wait_for(
        &format!("{} primary, mirrors in sync", c.nodes[i].name),
        timeout,
        || {
            let v = c.status_in_site(i)?["volumes"][0].clone();
            let epoch = v["epoch"].as_u64()?;
            let mirrors = v["mirrors"].as_array()?;
            (v["role"] == "primary"
                && epoch >= min_epoch
                && mirrors.len() == 2
                && mirrors.iter().all(|m| m["state"] == "in_sync"))
            .then_some(epoch)
        },
    )
}

/// Whether node `i` is a primary that may acknowledge writes: role
/// primary, its lease trusted, and holding the volume's primary key
/// (`blockmirror_volume_epoch_held`). A cut-off old primary still says
/// "primary" until it learns the newer epoch, but fenced; a restarted one
/// says "primary" (its last role) with a fresh lease before it has read
/// the cluster, but holds no key: neither acknowledges a write.
fn acting_primary(c: &Cluster, i: usize) -> bool {
    let primary_with_lease = c
        .status_in_site(i)
        .is_some_and(|s| s["volumes"][0]["role"] == "primary" && s["cluster"]["lease_ok"] == true);
    primary_with_lease && {
        let admin = c.nodes[i].admin;
        let body = c
            .sites
            .in_ns(i, || http_get(admin, "/metrics"))
            .ok()
            .and_then(|r| r.ok())
            .map(|(_, b)| b)
            .unwrap_or_default();
        metric(&body, "blockmirror_volume_epoch_held") == Some(1.0)
    }
}

/// Asserts that, for `span`, at most one node acts as primary (`up`: the
/// nodes to ask, from inside their sites).
fn at_most_one_primary_for(c: &Cluster, up: &[usize], span: Duration) {
    let end = Instant::now() + span;
    while Instant::now() < end {
        let primaries: Vec<&str> = up
            .iter()
            .filter(|&&i| acting_primary(c, i))
            .map(|&i| c.nodes[i].name.as_str())
            .collect();
        assert!(primaries.len() <= 1, "two primaries: {primaries:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What the history checker finds missing on `image` (None: every
/// acknowledged write is there). A failing log is kept for the post-mortem.
fn history_problem(image: &std::path::Path, log: &std::path::Path, whose: &str) -> Option<String> {
    let report = history::check_image(image, log).unwrap();
    if report.holds(Require::Acked) {
        return None;
    }
    // Named after the test's own temp dir: tests of one run do not collide.
    let tag = log
        .parent()
        .and_then(|d| d.file_name())
        .map(|d| d.to_string_lossy().into_owned())
        .unwrap_or_default();
    let keep = std::env::temp_dir().join(format!("cluster_netns-{tag}-history.log"));
    let kept = match std::fs::copy(log, &keep) {
        Ok(_) => format!(" (history log kept in {})", keep.display()),
        Err(_) => String::new(),
    };
    Some(format!(
        "{whose} lacks acknowledged writes{kept}:\n{}",
        report.summary()
    ))
}

/// What [`partition_the_primary`] leaves: the new primary, its epoch, and
/// what the history checker found missing on it.
struct Failover {
    new: usize,
    e2: u64,
    problems: Vec<String>,
}

/// The history writer, in site a, writes to a (primary at `e1`) through
/// a's own address; site a's link goes down. a must stop acknowledging
/// within its lease (its late writes refused), exactly one of b, c must
/// take a newer epoch and be promoted, never two primaries at once, and
/// every write a ever acknowledged must be on the new primary (collected
/// in `problems`, not asserted at once: the heal has its own story to
/// tell). The new primary then takes a write from outside.
fn partition_the_primary(c: &Cluster, e1: u64, log: &std::path::Path) -> Failover {
    let mut cfg = WriterConfig::new(
        &c.nodes[0].nbd,
        log,
        HISTORY_BLOCKS,
        Duration::from_secs(120),
    );
    cfg.queue_depth = 16;
    let progress = Progress::default();
    eprintln!(
        "history writer starts at {:?} (unix time)",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
    );
    let (new, e2, summary) = std::thread::scope(|s| {
        let w = s.spawn(|| c.sites.in_ns(0, || writer::run(&cfg, &progress)));
        wait_for("writes acknowledged by a", Duration::from_secs(30), || {
            assert!(!w.is_finished(), "the writer stopped early");
            (progress.writes_acked.load(Relaxed) >= 1000).then_some(())
        });

        // Site a loses its link: a reaches only its own etcd member.
        c.sites.partition(0).unwrap();
        let cut = Instant::now();
        let acked_at_cut = progress.writes_acked.load(Relaxed);

        // Within the lease a stops acknowledging: it says so, and no write
        // of its host is acknowledged any more.
        wait_for("a's lease is not trusted", TTL * 3, || {
            let st = c.status_in_site(0)?;
            (st["cluster"]["lease_ok"] == false).then_some(())
        });
        let fenced = cut.elapsed();
        let acked_fenced = progress.writes_acked.load(Relaxed);
        let (ok, out) = c.qemu_io_in_site(0, &["write -P 0xee 48M 64k"]);
        assert!(
            !ok,
            "the partitioned old primary acknowledged a write: {out}"
        );

        // Exactly one of b, c takes the next epoch and is promoted; at no
        // poll do two nodes act as primary.
        let (new, e2) = wait_for("one of b, c promoted", Duration::from_secs(30), || {
            let acting: Vec<usize> = (0..3).filter(|&i| acting_primary(c, i)).collect();
            assert!(acting.len() <= 1, "two primaries at once: {acting:?}");
            (1..3).find_map(|i| {
                let v = c.status_in_site(i)?["volumes"][0].clone();
                (v["role"] == "primary").then(|| (i, v["epoch"].as_u64().unwrap_or(0)))
            })
        });
        let promoted = cut.elapsed();
        assert!(e2 > e1, "the new primary's epoch {e2} is newer than {e1}");
        let other = 3 - new;
        assert_eq!(c.volume(other)["role"], "mirror", "exactly one primary");
        assert_eq!(c.volume(other)["epoch"].as_u64(), Some(e2));
        // Still cut off, a acknowledges nothing.
        assert_eq!(c.volume(0)["epoch"].as_u64(), Some(e1));
        let (ok, out) = c.qemu_io_in_site(0, &["write -P 0xee 48M 64k"]);
        assert!(!ok, "the deposed primary acknowledged a write: {out}");
        eprintln!(
            "partition: a fenced after {fenced:?} ({acked_at_cut} writes acknowledged at the \
             cut, {acked_fenced} when fenced), {} promoted at epoch {e2} after {promoted:?}",
            c.nodes[new].name
        );
        progress.stop.store(true, Relaxed);
        let summary = w
            .join()
            .unwrap()
            .expect("entering site a")
            .expect("history writer");
        (new, e2, summary)
    });
    eprintln!("history writer: {summary:?}");
    assert!(
        summary.writes_failed > 0 || summary.unanswered > 0,
        "the writer saw no refusal from the partitioned primary: {summary:?}"
    );
    let problems: Vec<String> = history_problem(&c.nodes[new].image, log, "the new primary")
        .into_iter()
        .collect();

    // The new primary serves, reached from outside (the root namespace).
    let uri = c.nodes[new].nbd.clone();
    wait_for(
        "a write acknowledged by the new primary",
        Duration::from_secs(20),
        || {
            let o = qemu_io(&uri, &["write -P 0xcd 32M 1M"]);
            let out = String::from_utf8_lossy(&o.stdout).to_string()
                + &String::from_utf8_lossy(&o.stderr);
            (o.status.success() && !out.contains("failed")).then_some(())
        },
    );
    // The coordinator agrees (asked of the members outside site a).
    let reachable = [c.etcd.member_endpoint(1), c.etcd.member_endpoint(2)].join(",");
    let out = run_ok(Command::new(BIN).args(["cluster", "status", "--etcd", &reachable, "--json"]));
    let view: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        view["volumes"][0]["primary"],
        c.nodes[new].name.as_str(),
        "{out}"
    );
    assert_eq!(view["volumes"][0]["epoch"].as_u64(), Some(e2), "{out}");
    Failover { new, e2, problems }
}

/// a is back as a mirror at `f.e2`: the new primary must resync it (the
/// divergence only: `applied_before` is a's applied-bytes count before it
/// came back) until every mirror is in sync; then all three images must be
/// identical, hold every acknowledged write and not a's refused one.
fn failback_and_compare(
    c: &mut Cluster,
    mut f: Failover,
    applied_before: u64,
    log: &std::path::Path,
) {
    let new = f.new;
    let healed = Instant::now();
    // The new primary's link to a must be taken: a wrote nothing it
    // acknowledged under any generation it did not publish, so the two are
    // not split, a is resynced from its last published generation plus the
    // regions it reports. (Fail at once, not at the timeout, if a refuses.)
    wait_for(
        "a resynced by the new primary",
        Duration::from_secs(60),
        || {
            let alog = c.nodes[0].node.log();
            if let Some(line) = alog.lines().find(|l| l.contains("split_brain")) {
                panic!(
                    "{}the old primary refuses its new primary as a split brain: it rotated to \
                     a generation while fenced (\"a mirror misses writes: new generation\" \
                     after its links failed in the partition) that it never published nor \
                     acknowledged a write under, and that generation now splits it from the \
                     new primary's:\n{line}",
                    f.problems
                        .iter()
                        .map(|p| format!("{p}\n\n"))
                        .collect::<String>()
                );
            }
            assert!(
                !acting_primary(c, 0),
                "the old primary acts as primary again"
            );
            let v = c.status_in_site(new)?["volumes"][0].clone();
            let mirrors = v["mirrors"].as_array()?;
            (mirrors.len() == 2 && mirrors.iter().all(|m| m["state"] == "in_sync")).then_some(())
        },
    );
    eprintln!(
        "failback: a in sync as a mirror after {:?}",
        healed.elapsed()
    );
    // Whether a's links reached a mirror before a stepped down, and were
    // refused for their old epoch (a race: reported, not required).
    for i in 1..3 {
        if let Some(line) = c.nodes[i]
            .node
            .log()
            .lines()
            .find(|l| l.contains("primary a comes with fencing epoch"))
        {
            eprintln!("refused by epoch on {}: {line}", c.nodes[i].name);
        }
    }
    let roles = c.roles();
    assert_eq!(
        roles.iter().filter(|r| *r == "primary").count(),
        1,
        "roles after the heal: {roles:?}"
    );
    assert_eq!(c.volume(0)["epoch"].as_u64(), Some(f.e2));
    // Only the divergence travelled: the new primary's 1 MiB and a's
    // reported regions (its unacknowledged late writes, at the bitmap's
    // 64 KiB grain), a few MiB at most. A copy of everything ever written
    // (the 16 MiB history region and more) is not failback.
    let resynced = c.volume(0)["applied_bytes"].as_u64().unwrap_or(0) - applied_before;
    eprintln!("failback: {resynced} bytes applied on a ({SIZE} in the volume)");
    assert!(
        resynced < 8 * MIB,
        "a was sent {resynced} bytes of a {SIZE}-byte volume: more than its divergence"
    );
    qemu_io_ok(&c.nodes[new].nbd, &["flush"]);
    for n in c.nodes.iter_mut() {
        n.node.stop_with("TERM");
    }
    let want = std::fs::read(&c.nodes[new].image).unwrap();
    for n in &c.nodes {
        assert!(
            std::fs::read(&n.image).unwrap() == want,
            "{}'s image differs from the new primary's\n{}",
            n.name,
            c.all_logs()
        );
    }
    // What the new primary wrote is there; a's refused late write is not.
    assert!(want[32 * MIB as usize..33 * MIB as usize]
        .iter()
        .all(|&b| b == 0xcd));
    assert!(
        want[48 * MIB as usize..(48 * MIB + 65536) as usize]
            .iter()
            .all(|&b| b == 0),
        "the old primary's refused write survived"
    );
    f.problems.extend(history_problem(
        &c.nodes[0].image,
        log,
        "the resynced old primary",
    ));
    assert!(f.problems.is_empty(), "{}", f.problems.join("\n\n"));
}

#[test]
fn a_partitioned_primary_is_replaced_by_one_site_and_rejoins_as_its_mirror() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(sites) = sites_or_skip() else {
        return;
    };
    require_tool("qemu-io");
    let t0 = Instant::now();
    let mut c = start_cluster(sites);
    let e1 = wait_primary_in_sync(&c, 0, 1, Duration::from_secs(60));
    eprintln!("cluster up, a primary at epoch {e1}: {:?}", t0.elapsed());
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("history.log");
    let f = partition_the_primary(&c, e1, &log);
    at_most_one_primary_for(&c, &[0, 1, 2], Duration::from_millis(500));

    // Heal: a, still running, learns the newer epoch and steps down.
    let applied_before = c.volume(0)["applied_bytes"].as_u64().unwrap_or(0);
    c.sites.heal(0).unwrap();
    wait_for(
        "a steps down at the new epoch",
        Duration::from_secs(30),
        || {
            let v = c.status_in_site(0)?["volumes"][0].clone();
            (v["role"] == "mirror" && v["epoch"].as_u64() == Some(f.e2)).then_some(())
        },
    );
    assert!(
        c.nodes[0].node.log().contains("demoting here"),
        "{}",
        c.nodes[0].node.log()
    );
    failback_and_compare(&mut c, f, applied_before, &log);
    eprintln!("total: {:?}", t0.elapsed());
}

#[test]
fn a_partitioned_primary_killed_while_cut_off_returns_as_a_mirror() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(sites) = sites_or_skip() else {
        return;
    };
    require_tool("qemu-io");
    let t0 = Instant::now();
    let mut c = start_cluster(sites);
    let e1 = wait_primary_in_sync(&c, 0, 1, Duration::from_secs(60));
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("history.log");
    let f = partition_the_primary(&c, e1, &log);

    // The old primary dies while cut off (SIGKILL: nothing flushed, no
    // clean record), the site heals, and it starts again: from its first
    // answer on it must never act as primary, and it comes back as a mirror
    // of the new one.
    c.nodes[0].node.stop_with("KILL");
    c.sites.heal(0).unwrap();
    c.nodes[0].node.restart();
    wait_for(
        "the restarted old primary is a mirror at the new epoch",
        Duration::from_secs(30),
        || {
            assert!(
                !acting_primary(&c, 0),
                "the restarted old primary acts as primary"
            );
            let v = c.status_in_site(0)?["volumes"][0].clone();
            (v["role"] == "mirror" && v["epoch"].as_u64() == Some(f.e2)).then_some(())
        },
    );
    // Its applied-bytes count started at 0 with the process.
    failback_and_compare(&mut c, f, 0, &log);
    eprintln!("total: {:?}", t0.elapsed());
}

#[test]
fn etcd_member_loss_changes_nothing_and_quorum_loss_fences_the_primary() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(sites) = sites_or_skip() else {
        return;
    };
    require_tool("qemu-io");
    let t0 = Instant::now();
    let mut c = start_cluster(sites);
    let e1 = wait_primary_in_sync(&c, 0, 1, Duration::from_secs(60));
    let uri = c.nodes[0].nbd.clone();
    let writes = |c: &Cluster, cmd: &str| c.qemu_io_in_site(0, &[cmd]).0;
    assert!(writes(&c, "write -P 0x11 0 1M"));

    // One member lost, a follower: nothing changes. (Losing the leader
    // costs an election, ~0.5-1 s here, with renewals failing meanwhile;
    // with this test's 2 s lease that can exceed the fence's margin and
    // refuse writes briefly. With the default 5 s lease it fits.)
    let leader = c.etcd.leader_seen_by(0, Duration::from_secs(2));
    let victim = (0..3).rev().find(|&i| Some(i) != leader).unwrap();
    c.etcd.kill(victim);
    let lost_one = Instant::now();
    // A whole lease period: renewals go on with two members of three.
    while lost_one.elapsed() < TTL {
        assert!(
            writes(&c, "write -P 0x12 1M 64k"),
            "a write refused with 2 of 3 members"
        );
    }
    let v = c.volume(0);
    assert_eq!(
        (v["role"].as_str(), v["epoch"].as_u64()),
        (Some("primary"), Some(e1))
    );
    assert_eq!(c.status_in_site(0).unwrap()["cluster"]["lease_ok"], true);

    // Quorum lost: within the lease the primary stops acknowledging. The
    // lease can still be renewed while the last member believes itself
    // (or another) leader: etcd 3.4's leader renews leases without a
    // quorum round and steps down only at its next quorum check (up to two
    // election timeouts). So the bound is a TTL after the last moment the
    // surviving member knew a leader, as the fence's docs count it.
    // (The victim above is 1 or 2; the other of the two goes now.)
    c.etcd.kill(3 - victim);
    let lost = Instant::now();
    let watching = std::sync::atomic::AtomicBool::new(true);
    let (tries, last_ack, last_leader) = std::thread::scope(|s| {
        let etcd = &c.etcd;
        let watcher = s.spawn(|| {
            let mut last = Duration::ZERO;
            while watching.load(Relaxed) {
                let t = lost.elapsed();
                let st = etcd.post_json(
                    0,
                    "/v3/maintenance/status",
                    &serde_json::json!({}),
                    Duration::from_millis(500),
                );
                if st.is_ok_and(|v| v["leader"].as_str().is_some_and(|l| l != "0")) {
                    last = t.max(last);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            last
        });
        // Writes one after another until one is refused.
        let mut last_ack = Duration::ZERO;
        let mut tries = Vec::new();
        loop {
            let start = lost.elapsed();
            let ok = writes(&c, "write -P 0x13 2M 64k");
            let end = lost.elapsed();
            tries.push((start, end, ok));
            if !ok {
                break;
            }
            last_ack = end;
            assert!(
                end < TTL * 5,
                "still acknowledging {end:?} after quorum loss"
            );
        }
        // Long enough to see the member give its leader up.
        std::thread::sleep(TTL / 2);
        watching.store(false, Relaxed);
        (tries, last_ack, watcher.join().unwrap())
    });
    eprintln!(
        "quorum lost: the last member knew a leader until {last_leader:?} after; last write \
         acknowledged {last_ack:?} after, first refused at {:?} (lease_ttl {TTL:?}, {} writes)",
        tries.last().unwrap().1,
        tries.len()
    );
    assert!(
        last_ack < last_leader + Duration::from_millis(100) + TTL,
        "a write acknowledged {last_ack:?} after quorum loss, more than the {TTL:?} lease after \
         the last member knew a leader ({last_leader:?}): {tries:?}"
    );
    assert_eq!(c.status_in_site(0).unwrap()["cluster"]["lease_ok"], false);
    // And it stays so; nobody is promoted without etcd.
    at_most_one_primary_for(&c, &[0, 1, 2], TTL * 2);
    for i in 1..3 {
        assert_eq!(
            c.volume(i)["role"],
            "mirror",
            "{} promoted without etcd",
            c.nodes[i].name
        );
    }
    assert!(!writes(&c, "write -P 0x13 2M 64k"));

    // Quorum back: a serves again (at a newer epoch: its key lapsed).
    c.etcd.restart(1).unwrap();
    c.etcd.restart(2).unwrap();
    c.etcd.wait_healthy(Duration::from_secs(30)).unwrap();
    wait_for("the primary serves again", Duration::from_secs(30), || {
        writes(&c, "write -P 0x14 3M 64k").then_some(())
    });
    let v = c.volume(0);
    assert_eq!(v["role"], "primary");
    assert!(v["epoch"].as_u64().unwrap_or(0) >= e1);
    for i in 1..3 {
        assert_eq!(c.volume(i)["role"], "mirror");
    }
    wait_primary_in_sync(&c, 0, e1, Duration::from_secs(30));
    qemu_io_ok(&uri, &["read -P 0x11 0 1M", "read -P 0x14 3M 64k"]);
    eprintln!("total: {:?}", t0.elapsed());
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for n in &self.nodes {
                let log = n.node.all_logs();
                // The whole log outlives the temp dir, for the post-mortem.
                let keep = std::env::temp_dir().join(format!(
                    "cluster_netns-{}-{}.log",
                    self.sites.ns(0),
                    n.name
                ));
                if std::fs::write(&keep, &log).is_ok() {
                    eprintln!("node {}'s whole log: {}", n.name, keep.display());
                }
                let tail: Vec<&str> = log.lines().rev().take(60).collect();
                eprintln!("--- node {} (last lines) ---", n.name);
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        // Nodes first: a node outliving its namespace would keep it.
        self.nodes.clear();
    }
}
