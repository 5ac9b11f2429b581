//! TLS end to end with real clients: `certs init`, NBD STARTTLS with
//! nbdinfo, nbdcopy, qemu-img and qemu-io (GnuTLS clients), and the
//! refusals (plaintext to a `require` export, a client certificate from
//! another CA, an expired one), each logged with the peer's address.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

/// `blockmirror certs init DIR --nodes ...` (extra args appended).
fn certs_init(dir: &Path, nodes: &str, extra: &[&str]) {
    let d = dir.to_str().unwrap();
    let mut args = vec!["certs", "init", d, "--nodes", nodes];
    args.extend_from_slice(extra);
    let out = cli(&args);
    assert!(
        out.status.success(),
        "certs init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tls_table(certs: &Path, node: &str) -> String {
    format!(
        "[tls]\nca = \"{0}/ca.pem\"\ncert = \"{0}/{node}.pem\"\nkey = \"{0}/{node}.key\"\n",
        certs.display()
    )
}

/// A standalone node named site-a whose one volume has `tls = mode`.
fn tls_node(certs: &Path, mode: &str) -> (TestNode, u16) {
    let dir = tempfile::tempdir().unwrap();
    let admin: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let port = free_port();
    let img = dir.path().join("db.img");
    let text = format!(
        "node = \"site-a\"\nadmin = \"{admin}\"\n{}\n[[volume]]\nname = \"db\"\npath = \"{}\"\n\
         size = {}\nrole = \"primary\"\nnbd = \"127.0.0.1:{port}\"\ntls = \"{mode}\"\n",
        tls_table(certs, "site-a"),
        img.display(),
        32 * MIB
    );
    let node = TestNode::from_config(
        dir,
        &text,
        admin,
        vec![format!("nbd://127.0.0.1:{port}/db")],
        vec![img],
        Vec::new(),
    );
    (node, port)
}

fn nbds(port: u16, creds: &Path) -> String {
    format!(
        "nbds://127.0.0.1:{port}/db?tls-certificates={}",
        creds.display()
    )
}

fn qemu_opts(port: u16, creds: &Path) -> Vec<String> {
    vec![
        "--object".into(),
        format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            creds.display()
        ),
        "--image-opts".into(),
        format!("driver=nbd,host=127.0.0.1,port={port},export=db,tls-creds=tls0"),
    ]
}

fn wait_log(node: &TestNode, what: &str, pred: impl Fn(&str) -> bool) -> String {
    wait_for(what, Duration::from_secs(10), || {
        let l = node.log();
        pred(&l).then_some(l)
    })
}

#[test]
fn nbd_clients_read_and_write_over_tls_and_refusals_are_logged() {
    require_tool("nbdinfo");
    require_tool("nbdcopy");
    require_tool("qemu-io");
    let certs = tempfile::tempdir().unwrap();
    certs_init(certs.path(), "site-a,site-b", &[]);
    let creds = certs.path().join("qemu-client");
    for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
        assert!(creds.join(f).is_file(), "{f}");
    }
    let (node, port) = tls_node(certs.path(), "require");

    // libnbd: nbdinfo over TLS, nbdcopy in and out.
    let out = run_ok(Command::new("nbdinfo").arg(nbds(port, &creds)));
    assert!(out.contains("with TLS"), "{out}");
    assert!(out.contains("export-size: 33554432"), "{out}");
    let src = node.dir.path().join("random.raw");
    random_file(&src, 32 * MIB as usize, 42);
    run_ok(Command::new("nbdcopy").arg(&src).arg(nbds(port, &creds)));
    run_ok(Command::new("cmp").arg(&src).arg(node.image()));
    let back = node.dir.path().join("back.raw");
    run_ok(Command::new("nbdcopy").arg(nbds(port, &creds)).arg(&back));
    run_ok(Command::new("cmp").arg(&src).arg(&back));

    // qemu: qemu-img info, qemu-io write and read back.
    let out = run_ok(
        Command::new("qemu-img")
            .arg("info")
            .args(qemu_opts(port, &creds)),
    );
    assert!(out.contains("virtual size: 32 MiB"), "{out}");
    let out = run_ok(Command::new("qemu-io").args(qemu_opts(port, &creds)).args([
        "-c",
        "write -P 0x5c 1M 64k",
        "-c",
        "flush",
        "-c",
        "read -P 0x5c 1M 64k",
    ]));
    assert!(!out.contains("verification failed"), "{out}");
    let img = std::fs::read(node.image()).unwrap();
    assert!(img[MIB as usize..MIB as usize + 65536]
        .iter()
        .all(|&b| b == 0x5c));

    // Refusal: a plaintext client.
    let plain = run(Command::new("qemu-img").args([
        "info",
        "-f",
        "raw",
        &format!("nbd://127.0.0.1:{port}/db"),
    ]));
    assert!(!plain.status.success());
    let err = String::from_utf8_lossy(&plain.stderr);
    assert!(err.contains("TLS"), "qemu-img's error: {err}");
    let plain = run(Command::new("nbdinfo").arg(format!("nbd://127.0.0.1:{port}/db")));
    assert!(!plain.status.success());
    wait_log(&node, "the plaintext refusal in the log", |l| {
        l.contains("nbd{peer=127.0.0.1:") && l.contains("refused, it requires TLS")
    });

    // Refusal: a client certificate from another CA.
    let other = tempfile::tempdir().unwrap();
    certs_init(other.path(), "x", &[]);
    // The stranger trusts our CA (so it is our server that refuses).
    std::fs::copy(
        certs.path().join("ca.pem"),
        other.path().join("qemu-client/ca-cert.pem"),
    )
    .unwrap();
    let bad = run(Command::new("nbdinfo").arg(nbds(port, &other.path().join("qemu-client"))));
    assert!(
        !bad.status.success(),
        "a stranger's certificate was accepted"
    );
    let log = wait_log(&node, "the stranger's refusal in the log", |l| {
        l.contains("TLS handshake after NBD_OPT_STARTTLS failed")
    });
    assert!(
        log.lines()
            .filter(|l| l.contains("TLS handshake after"))
            .all(|l| l.contains("peer=127.0.0.1:")),
        "{log}"
    );
    // Nothing a refused client did reached the image.
    let img2 = std::fs::read(node.image()).unwrap();
    assert!(img == img2);
}

#[test]
fn an_expired_client_certificate_from_the_ca_is_refused() {
    require_tool("nbdinfo");
    let certs = tempfile::tempdir().unwrap();
    certs_init(certs.path(), "site-a", &["--expired-client"]);
    let (node, port) = tls_node(certs.path(), "require");
    let bad = run(Command::new("nbdinfo").arg(nbds(port, &certs.path().join("qemu-client"))));
    assert!(!bad.status.success(), "an expired certificate was accepted");
    let log = wait_log(&node, "the refusal in the log", |l| {
        l.contains("TLS handshake after NBD_OPT_STARTTLS failed")
    });
    assert!(log.contains("expired"), "{log}");
    assert!(log.contains("peer=127.0.0.1:"), "{log}");
}

#[test]
fn allow_serves_both_and_off_refuses_starttls() {
    require_tool("nbdinfo");
    let certs = tempfile::tempdir().unwrap();
    certs_init(certs.path(), "site-a", &[]);
    let creds = certs.path().join("qemu-client");
    let (node, port) = tls_node(certs.path(), "allow");
    let out = run_ok(Command::new("nbdinfo").arg(nbds(port, &creds)));
    assert!(out.contains("with TLS"), "{out}");
    let out = run_ok(Command::new("nbdinfo").arg(node.uri()));
    assert!(out.contains("without TLS"), "{out}");
    drop(node);

    let (node, port) = tls_node(certs.path(), "off");
    let r = run(Command::new("nbdinfo").arg(nbds(port, &creds)));
    assert!(!r.status.success(), "TLS to an `off` export");
    let out = run_ok(Command::new("nbdinfo").arg(node.uri()));
    assert!(out.contains("without TLS"), "{out}");
}

// ---------------------------------------------------------------------------
// Replication links.

/// A pair whose nodes run with `[tls]` (the primary as site-a, the mirror
/// with the certificate files `mirror_cert`.pem/.key from `certs`), the
/// primary expecting `peer_name` in the mirror's certificate.
fn tls_pair(certs: &Path, mirror_cert: &str, peer_name: &str) -> PairBuilder {
    PairBuilder::new(64 * MIB)
        .primary_node(&tls_table(certs, "site-a"))
        .mirror_node(&tls_table(certs, mirror_cert))
        .mirror_table(&format!("mode = \"sync\"\npeer_name = \"{peer_name}\""))
}

#[test]
fn a_sync_mirror_over_mutual_tls_holds_every_acknowledged_write_after_a_primary_kill() {
    use blockmirror_testkit::history::{self, Require};
    use blockmirror_testkit::writer::{self, End, Progress, WriterConfig};
    let certs = tempfile::tempdir().unwrap();
    certs_init(certs.path(), "site-a,site-b", &[]);
    let mut pair = tls_pair(certs.path(), "site-b", "site-b").start();
    assert!(pair.primary.log().contains("tls=true"), "{}", pair.logs());
    assert!(pair.mirror.log().contains("tls=true"), "{}", pair.logs());

    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("history.log");
    let cfg = WriterConfig::new(pair.primary.uri(), &log, 4096, Duration::from_secs(30));
    let progress = Progress::default();
    let summary = std::thread::scope(|s| {
        let w = s.spawn(|| writer::run(&cfg, &progress));
        wait_for(
            "acknowledged writes and flushes",
            Duration::from_secs(30),
            || {
                use std::sync::atomic::Ordering::Relaxed;
                assert!(!w.is_finished(), "the writer stopped early");
                (progress.flushes_acked.load(Relaxed) >= 60
                    && progress.writes_acked.load(Relaxed) >= 3000)
                    .then_some(())
            },
        );
        pair.primary.stop_with("KILL");
        w.join().unwrap().expect("history writer")
    });
    assert!(matches!(summary.end, End::ConnectionLost(_)), "{summary:?}");
    wait_for(
        "the mirror to see the link drop",
        Duration::from_secs(10),
        || {
            pair.mirror.status_json()["volumes"][0]["primary"]
                .is_null()
                .then_some(())
        },
    );
    let report = history::check_image(pair.mirror.image(), &log).unwrap();
    let text = format!("{summary:?}\n{}", report.summary());
    assert!(report.required_flushed > 0, "{text}");
    assert!(report.holds(Require::Flushed), "{text}");
    assert!(report.holds(Require::Acked), "{text}");
    assert!(report.holds(Require::Prefix), "{text}");
}

#[test]
fn a_mirror_whose_certificate_names_another_node_is_refused_until_it_reloads_the_right_one() {
    let certs = tempfile::tempdir().unwrap();
    certs_init(certs.path(), "site-a,site-b,site-c", &[]);
    // The mirror's files start as site-c's; the primary expects site-b.
    for ext in ["pem", "key"] {
        std::fs::copy(
            certs.path().join(format!("site-c.{ext}")),
            certs.path().join(format!("mirror.{ext}")),
        )
        .unwrap();
    }
    let pair = tls_pair(certs.path(), "mirror", "site-b").no_wait().start();
    let log = wait_log(&pair.primary, "the refusal in the primary's log", |l| {
        l.contains("mirror link connect failed")
    });
    let line = log
        .lines()
        .find(|l| l.contains("mirror link connect failed"))
        .unwrap();
    assert!(
        line.contains(&format!("peer={}", pair.mirror_listen)),
        "{line}"
    );
    assert!(line.contains("name site-b"), "{line}");
    assert!(line.contains("not valid for name \"site-b\""), "{line}");
    assert_ne!(pair.link()["connection"], "connected");
    // Nothing reached the mirror's image.
    assert!(std::fs::read(pair.mirror.image())
        .unwrap()
        .iter()
        .all(|&b| b == 0));

    // The right certificate, and SIGHUP: the next reconnect succeeds.
    for ext in ["pem", "key"] {
        std::fs::copy(
            certs.path().join(format!("site-b.{ext}")),
            certs.path().join(format!("mirror.{ext}")),
        )
        .unwrap();
    }
    run_ok(Command::new("kill").args(["-HUP", &pair.mirror.pid().to_string()]));
    wait_log(&pair.mirror, "the reload in the mirror's log", |l| {
        l.contains("tls certificates reloaded")
    });
    pair.wait_in_sync(Duration::from_secs(30));
    qemu_io_ok(pair.primary.uri(), &["write -P 0x7e 0 1M", "flush"]);
    pair.assert_images_identical();
    // Job connections (verify, here with remote reads of the data) use TLS too.
    let admin = pair.primary.admin.to_string();
    for mode in [&[][..], &["--full"][..]] {
        let out = run(Command::new(BIN)
            .args(["verify", PAIR_VOLUME, "--admin", &admin])
            .args(mode));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "verify {mode:?}: {text}\n{}",
            pair.logs()
        );
        assert!(text.contains("identical"), "{text}");
    }
    // And the admin API reloads too.
    let (code, body) = http_post(pair.mirror.admin, "/admin/reload-tls").unwrap();
    assert_eq!(code, 200, "{body}");
}

#[test]
fn a_plaintext_primary_is_refused_by_a_tls_mirror() {
    let certs = tempfile::tempdir().unwrap();
    certs_init(certs.path(), "site-a,site-b", &[]);
    let pair = PairBuilder::new(16 * MIB)
        .mirror_node(&tls_table(certs.path(), "site-b"))
        .no_wait()
        .start();
    let log = wait_log(&pair.mirror, "the refusal in the mirror's log", |l| {
        l.contains("replication peer refused") && l.contains("TLS handshake failed")
    });
    assert!(log.contains("peer=127.0.0.1:"), "{log}");
    assert_ne!(pair.link()["connection"], "connected");
}
