//! Replication links with real processes: several mirrors per primary, and a
//! corrupted frame on an authenticated link.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use blockmirror_repl::{Frame, FrameReader, FrameWriter, NodeHello, VolumeIdentity};
use bytes::{BufMut, BytesMut};
use common::*;

const MIB: u64 = 1 << 20;

/// A mirror node for volume `vol` of `size` bytes; returns it and its listen address.
fn mirror_node(secret: &str, vol: &str, size: u64) -> (TestNode, SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret.key"), secret).unwrap();
    let (admin, listen, nbd) = (free_port(), free_port(), free_port());
    let img = dir.path().join(format!("{vol}.img"));
    let text = format!(
        "node = \"mirror-{listen}\"\nlisten = \"127.0.0.1:{listen}\"\nadmin = \"127.0.0.1:{admin}\"\nsecret_file = \"secret.key\"\n\n[[volume]]\nname = \"{vol}\"\npath = \"{vol}.img\"\nsize = {size}\nrole = \"mirror\"\nnbd = \"127.0.0.1:{nbd}\"\n"
    );
    let node = TestNode::from_config(
        dir,
        &text,
        format!("127.0.0.1:{admin}").parse().unwrap(),
        vec![format!("nbd://127.0.0.1:{nbd}/{vol}")],
        vec![img],
        vec![],
    );
    (node, format!("127.0.0.1:{listen}").parse().unwrap())
}

#[test]
fn one_primary_two_mirrors() {
    require_tool("qemu-io");
    let secret = new_secret();
    let (m1, l1) = mirror_node(&secret, "db", 16 * MIB);
    let (m2, l2) = mirror_node(&secret, "db", 16 * MIB);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret.key"), &secret).unwrap();
    let (admin, nbd) = (free_port(), free_port());
    let img = dir.path().join("db.img");
    let text = format!(
        "node = \"primary\"\nadmin = \"127.0.0.1:{admin}\"\nsecret_file = \"secret.key\"\n\n[[volume]]\nname = \"db\"\npath = \"db.img\"\nsize = {}\nrole = \"primary\"\nnbd = \"127.0.0.1:{nbd}\"\n\n[[volume.mirror]]\npeer = \"{l1}\"\n\n[[volume.mirror]]\npeer = \"{l2}\"\n",
        16 * MIB
    );
    let primary = TestNode::from_config(
        dir,
        &text,
        format!("127.0.0.1:{admin}").parse().unwrap(),
        vec![format!("nbd://127.0.0.1:{nbd}/db")],
        vec![img],
        vec![],
    );
    let both_in_sync = || {
        let st = primary.status_json();
        let m = st["volumes"][0]["mirrors"].as_array().unwrap().clone();
        (m.len() == 2 && m.iter().all(|x| x["state"] == "in_sync")).then_some(())
    };
    wait_for(
        "both mirrors in sync",
        Duration::from_secs(30),
        both_in_sync,
    );
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x3c 1M 2M",
        "-c",
        "flush",
        primary.uri(),
    ]));
    for m in [&m1, &m2] {
        run_ok(Command::new("cmp").arg(primary.image()).arg(m.image()));
    }
    // One mirror goes away: the other keeps receiving; the first catches up.
    let mut m1 = m1;
    m1.stop_with("KILL");
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x4d 8M 1M",
        "-c",
        "flush",
        primary.uri(),
    ]));
    run_ok(Command::new("cmp").arg(primary.image()).arg(m2.image()));
    m1.restart();
    wait_for(
        "the first mirror back in sync",
        Duration::from_secs(30),
        both_in_sync,
    );
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "flush", primary.uri()]));
    run_ok(Command::new("cmp").arg(primary.image()).arg(m1.image()));
}

#[test]
fn corrupted_frame_on_an_authenticated_link_is_not_applied() {
    let secret = new_secret();
    let (mirror, listen) = mirror_node(&secret, "db", 4 * MIB);
    let before = std::fs::read(mirror.image()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let reply = rt.block_on(async {
        let mut s = tokio::net::TcpStream::connect(listen).await.unwrap();
        let hello = NodeHello {
            node: "impostor-with-the-secret".into(),
            volume: VolumeIdentity {
                name: "db".into(),
                volume_id: [1; 16],
                size: 4 * MIB,
                generation: 1,
                history: [0; 4],
            },
        };
        blockmirror_repl::connect(&mut s, secret.as_bytes(), &hello)
            .await
            .expect("authenticated");
        // A valid Write frame for 4 KiB at 0, with one payload byte flipped
        // on the wire: its payload crc no longer matches.
        let mut frame = BytesMut::new();
        Frame::Write {
            id: 1,
            offset: 0,
            fua: false,
            data: vec![0xee; 4096].into(),
        }
        .encode(&mut frame);
        let last = frame.len() - 1;
        frame[last] ^= 0x01;
        // And a good frame after it, which must not be applied either.
        let mut good = BytesMut::new();
        Frame::Write {
            id: 2,
            offset: 8192,
            fua: false,
            data: vec![0xdd; 4096].into(),
        }
        .encode(&mut good);
        frame.put_slice(&good);
        let (rd, wr) = s.into_split();
        let mut w = FrameWriter::new(wr);
        tokio::io::AsyncWriteExt::write_all(w.get_mut(), &frame)
            .await
            .unwrap();
        let mut r = FrameReader::new(rd);
        // The mirror first reports its divergent regions (none here).
        loop {
            let f = tokio::time::timeout(Duration::from_secs(10), r.next())
                .await
                .expect("the mirror answers or closes");
            if !matches!(f, Ok(Some(Frame::Divergence { .. }))) {
                break f;
            }
        }
    });
    match reply {
        Ok(Some(Frame::Error { message, .. })) => {
            assert!(message.contains("checksum"), "{message}")
        }
        other => panic!("expected an Error frame, got {other:?}"),
    }
    wait_for(
        "the mirror to log the closed link",
        Duration::from_secs(10),
        || {
            mirror
                .log()
                .contains("closing replication link")
                .then_some(())
        },
    );
    let after = std::fs::read(mirror.image()).unwrap();
    assert!(
        before == after,
        "nothing from the corrupted link was applied"
    );
}
