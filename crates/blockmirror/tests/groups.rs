//! Consistency groups with real processes: the volumes of a group mirror to
//! a site together or not at all.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

/// A mirror node serving `volumes`, and a primary whose volumes `db` and
/// `log` both mirror to it, in group `app` when `grouped`.
fn setup(mirror_volumes: &[&str], grouped: bool) -> (TestNode, TestNode) {
    setup_with(mirror_volumes, grouped, "", "")
}

/// [`setup`]; `mirror_keys`: more keys of each `[[volume.mirror]]` table,
/// `site_keys`: of each volume on the mirror node.
fn setup_with(
    mirror_volumes: &[&str],
    grouped: bool,
    mirror_keys: &str,
    site_keys: &str,
) -> (TestNode, TestNode) {
    let secret = new_secret();
    let mdir = tempfile::tempdir().unwrap();
    std::fs::write(mdir.path().join("secret.key"), &secret).unwrap();
    let (m_admin, m_listen) = (free_port(), free_port());
    let mut mtext = format!(
        "node = \"site-b\"\nlisten = \"127.0.0.1:{m_listen}\"\nadmin = \"127.0.0.1:{m_admin}\"\nsecret_file = \"secret.key\"\n"
    );
    for v in mirror_volumes {
        mtext += &format!(
            "\n[[volume]]\nname = \"{v}\"\npath = \"{v}.img\"\nsize = {}\nrole = \"mirror\"\nnbd = \"127.0.0.1:{}\"\n{site_keys}\n",
            16 * MIB,
            free_port()
        );
    }
    let images = mirror_volumes
        .iter()
        .map(|v| mdir.path().join(format!("{v}.img")))
        .collect();
    let mirror = TestNode::from_config(
        mdir,
        &mtext,
        format!("127.0.0.1:{m_admin}").parse().unwrap(),
        vec![],
        images,
        vec![],
    );
    let pdir = tempfile::tempdir().unwrap();
    std::fs::write(pdir.path().join("secret.key"), &secret).unwrap();
    let p_admin = free_port();
    let mut ptext = format!(
        "node = \"site-a\"\nadmin = \"127.0.0.1:{p_admin}\"\nsecret_file = \"secret.key\"\n"
    );
    let mut uris = Vec::new();
    for v in ["db", "log"] {
        let port = free_port();
        let group = if grouped {
            "consistency_group = \"app\"\n"
        } else {
            ""
        };
        ptext += &format!(
            "\n[[volume]]\nname = \"{v}\"\npath = \"{v}.img\"\nsize = {}\nrole = \"primary\"\nnbd = \"127.0.0.1:{port}\"\nmirror_timeout = \"1s\"\n{group}\n[[volume.mirror]]\npeer = \"127.0.0.1:{m_listen}\"\n{mirror_keys}\n",
            16 * MIB
        );
        uris.push(format!("nbd://127.0.0.1:{port}/{v}"));
    }
    let primary = TestNode::from_config(
        pdir,
        &ptext,
        format!("127.0.0.1:{p_admin}").parse().unwrap(),
        uris,
        vec![],
        vec![],
    );
    (primary, mirror)
}

fn mirror_state(node: &TestNode, volume: &str) -> (String, String) {
    let st = node.status_json();
    let v = st["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == volume)
        .unwrap()
        .clone();
    let m = &v["mirrors"][0];
    (
        m["connection"].as_str().unwrap().to_owned(),
        m["state"].as_str().unwrap().to_owned(),
    )
}

#[test]
fn a_group_resumes_only_when_every_member_can() {
    // The site has no volume "log": log's link is refused, so db, in the same
    // group, must not be fed either (the site would hold db newer than log).
    let (primary, _mirror) = setup(&["db"], true);
    wait_for("log's link to be refused", Duration::from_secs(20), || {
        primary
            .log()
            .contains("mirror link connect failed")
            .then_some(())
    });
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 7 0 1M", &primary.uris[0]]));
    let (_, db_state) = mirror_state(&primary, "db");
    assert_eq!(db_state, "degraded", "db must wait for its group");
    let st = primary.status_json();
    assert!(
        st["volumes"][0]["mirrors"][0]["out_of_sync_bytes"]
            .as_u64()
            .unwrap()
            > 0
    );

    // Without the group, db goes in sync on its own.
    let (primary, _mirror) = setup(&["db"], false);
    wait_for(
        "db in sync without a group",
        Duration::from_secs(20),
        || (mirror_state(&primary, "db").1 == "in_sync").then_some(()),
    );
}

#[test]
fn a_group_goes_live_together_and_is_suspended_together() {
    require_tool("qemu-io");
    let (primary, mut mirror) = setup(&["db", "log"], true);
    wait_for("both members in sync", Duration::from_secs(30), || {
        (mirror_state(&primary, "db").1 == "in_sync"
            && mirror_state(&primary, "log").1 == "in_sync")
            .then_some(())
    });
    assert!(
        primary.log().contains("consistency group"),
        "{}",
        primary.log()
    );
    // The site goes away: both members are suspended; writes to both go on.
    mirror.stop_with("KILL");
    for uri in &primary.uris {
        run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 9 0 64k", uri]));
    }
    wait_for("both members degraded", Duration::from_secs(20), || {
        (mirror_state(&primary, "db").1 == "degraded"
            && mirror_state(&primary, "log").1 == "degraded")
            .then_some(())
    });
    // It comes back: they resume together and catch up.
    mirror.restart();
    wait_for("both members back in sync", Duration::from_secs(30), || {
        (mirror_state(&primary, "db").1 == "in_sync"
            && mirror_state(&primary, "log").1 == "in_sync")
            .then_some(())
    });
}

/// Async across a group (DESIGN.md guarantee 7): a writer makes a chain of
/// dependent writes that alternate between the group's two volumes (each
/// issued after the one before was answered, as a database's log and data
/// writes are), and the mirror node is killed in the middle of it. What the
/// killed mirror holds must be a prefix of the chain: a write on one volume
/// is never there without every write before it on the other. The links to
/// the site are separate connections, so without the group's gate the
/// later writes of one volume can land before the earlier ones of the
/// other.
#[test]
fn an_async_group_mirror_holds_a_point_both_volumes_passed_through() {
    use blockmirror_testkit::nbd;
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
    use std::sync::Arc;

    const BLOCK: usize = 4096;
    const CMD_WRITE: u16 = 1;
    let (primary, mut mirror) = setup_with(
        &["db", "log"],
        true,
        "mode = \"async\"",
        "fault_injection = true",
    );
    wait_for("both members in sync", Duration::from_secs(30), || {
        (mirror_state(&primary, "db").1 == "in_sync"
            && mirror_state(&primary, "log").1 == "in_sync")
            .then_some(())
    });
    // The site's disk under `log` is slow: its link's writes are applied
    // later than db's, as when one volume's disk or path is busier.
    let (code, body) = http_request(
        mirror.admin,
        "POST",
        "/volumes/log/faults",
        &[],
        r#"{"write_latency_us": 2000}"#,
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");
    // 16 MiB volumes: 4096 blocks each, written once (no overwrite hides
    // a missing write).
    let per_volume = (16 * MIB) as usize / BLOCK;
    let total = 2 * per_volume;
    let done = Arc::new(AtomicU64::new(0));
    let writer = {
        let uris = primary.uris.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            let mut conns: Vec<nbd::Connection> = uris
                .iter()
                .map(|u| nbd::connect(&nbd::Uri::parse(u).unwrap()).unwrap())
                .collect();
            let mut req = bytes::BytesMut::new();
            for k in 0..total {
                let (vol, block) = (k % 2, k / 2);
                req.clear();
                nbd::request(
                    CMD_WRITE,
                    0,
                    k as u64,
                    (block * BLOCK) as u64,
                    BLOCK as u32,
                    &mut req,
                );
                let tag = (k as u64 + 1).to_le_bytes();
                for _ in 0..BLOCK / 8 {
                    req.extend_from_slice(&tag);
                }
                let c = &mut conns[vol];
                c.stream.write_all(&req).unwrap();
                let (error, cookie) = nbd::read_simple_reply(&mut c.stream).unwrap();
                assert_eq!((error, cookie), (0, k as u64), "write {k}");
                done.store(k as u64 + 1, SeqCst);
            }
            for c in &mut conns {
                let _ = c.stream.shutdown();
            }
        })
    };
    // Kill the site in the middle of the chain.
    wait_for(
        "a third of the chain written",
        Duration::from_secs(60),
        || (done.load(SeqCst) as usize > total / 3).then_some(()),
    );
    mirror.stop_with("KILL");
    let killed_at = done.load(SeqCst);
    writer.join().unwrap();

    // What the site holds, volume by volume: each block's tag (0: never
    // written there).
    let mut present = std::collections::BTreeSet::new();
    for (vol, image) in mirror.images.iter().enumerate() {
        let mut f = std::fs::File::open(image).unwrap();
        let mut buf = vec![0u8; BLOCK];
        for block in 0..per_volume {
            f.read_exact(&mut buf).unwrap();
            let tag = u64::from_le_bytes(buf[..8].try_into().unwrap());
            if tag == 0 {
                continue;
            }
            let k = tag - 1;
            assert!(
                buf.chunks(8).all(|c| c == tag.to_le_bytes()),
                "block {block} of volume {vol} is torn"
            );
            assert_eq!(
                (k as usize % 2, k as usize / 2),
                (vol, block),
                "write {k} found in the wrong place"
            );
            present.insert(k);
        }
    }
    let held = present.len() as u64;
    let missing: Vec<u64> = (0..held).filter(|k| !present.contains(k)).take(5).collect();
    assert!(
        missing.is_empty(),
        "the site holds {held} writes of the chain, but not a prefix: writes {missing:?} are \
         missing while later ones are there (killed after {killed_at} were answered)"
    );
    assert!(held > 0, "the site held nothing of the chain");
    eprintln!(
        "the site held the first {held} writes of the chain (killed after {killed_at} answered); \
         gates: {}",
        metric(&primary.metrics(), "blockmirror_mirror_group_gates_total").unwrap_or(-1.0)
    );
}
