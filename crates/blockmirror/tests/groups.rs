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
    let secret = new_secret();
    let mdir = tempfile::tempdir().unwrap();
    std::fs::write(mdir.path().join("secret.key"), &secret).unwrap();
    let (m_admin, m_listen) = (free_port(), free_port());
    let mut mtext = format!(
        "node = \"site-b\"\nlisten = \"127.0.0.1:{m_listen}\"\nadmin = \"127.0.0.1:{m_admin}\"\nsecret_file = \"secret.key\"\n"
    );
    for v in mirror_volumes {
        mtext += &format!(
            "\n[[volume]]\nname = \"{v}\"\npath = \"{v}.img\"\nsize = {}\nrole = \"mirror\"\nnbd = \"127.0.0.1:{}\"\n",
            16 * MIB,
            free_port()
        );
    }
    let mirror = TestNode::from_config(
        mdir,
        &mtext,
        format!("127.0.0.1:{m_admin}").parse().unwrap(),
        vec![],
        vec![],
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
            "\n[[volume]]\nname = \"{v}\"\npath = \"{v}.img\"\nsize = {}\nrole = \"primary\"\nnbd = \"127.0.0.1:{port}\"\nmirror_timeout = \"1s\"\n{group}\n[[volume.mirror]]\npeer = \"127.0.0.1:{m_listen}\"\n",
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
