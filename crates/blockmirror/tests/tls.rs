//! TLS end to end with real clients: `certs init`, NBD STARTTLS with
//! nbdinfo, nbdcopy, qemu-img and qemu-io (GnuTLS clients), and the
//! refusals (plaintext to a `require` export, a client certificate from
//! another CA, an expired one), each logged with the peer's address;
//! mutual TLS on replication links; the admin API's token and HTTPS.

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

/// A `[tls]` table for `node`'s files in `certs`; the admin port stays
/// plain HTTP (the harness polls it), except in the admin tests.
fn tls_table(certs: &Path, node: &str) -> String {
    format!(
        "[tls]\nca = \"{0}/ca.pem\"\ncert = \"{0}/{node}.pem\"\nkey = \"{0}/{node}.key\"\nadmin_https = false\n",
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

/// fio's nbd engine over TLS. fio 3.33 cannot take `tls-certificates=` in
/// its `--uri`: libnbd refuses it with "nbd_connect_uri: local file access
/// (tls-certificates) is not allowed, call nbd_set_uri_allow_local_file to
/// enable this: Operation not permitted" (fio does not call that). So fio
/// uses libnbd's default credentials directory: `$HOME/.pki/libnbd` for a
/// non-root user (`/etc/pki/libnbd` for root, which a test must not write):
/// as root the test runs fio as nobody. With the export requiring client
/// certificates, fio presents the one in that directory.
#[test]
fn fio_writes_and_verifies_over_tls_with_libnbds_default_credentials() {
    require_tool("fio");
    let certs = tempfile::tempdir().unwrap();
    certs_init(certs.path(), "site-a", &[]);
    let dir = tempfile::tempdir().unwrap();
    let admin: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let port = free_port();
    let img = dir.path().join("db.img");
    let text = format!(
        "node = \"site-a\"\nadmin = \"{admin}\"\n{}nbd_client_certs = \"require\"\n\
         [[volume]]\nname = \"db\"\npath = \"{}\"\nsize = {}\nrole = \"primary\"\n\
         nbd = \"127.0.0.1:{port}\"\ntls = \"require\"\n",
        tls_table(certs.path(), "site-a"),
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
    let root = run_ok(Command::new("id").arg("-u")).trim() == "0";
    if root {
        require_tool("setpriv");
    }
    // A home whose .pki/libnbd holds `creds` (None: no such directory),
    // readable by the user fio runs as.
    let home = |creds: Option<&Path>| {
        let h = tempfile::tempdir().unwrap();
        if let Some(c) = creds {
            let d = h.path().join(".pki/libnbd");
            std::fs::create_dir_all(&d).unwrap();
            for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
                std::fs::copy(c.join(f), d.join(f)).unwrap();
            }
        }
        if root {
            run_ok(
                Command::new("chown")
                    .args(["-R", "65534:65534"])
                    .arg(h.path()),
            );
        }
        h
    };
    let fio = |home: &Path, rw: &str| {
        let mut cmd = if root {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "fio"]);
            c
        } else {
            Command::new("fio")
        };
        cmd.env("HOME", home).current_dir(home).args([
            "--name=tls",
            "--ioengine=nbd",
            &format!("--uri=nbds://127.0.0.1:{port}/db"),
            &format!("--rw={rw}"),
            "--bs=4k",
            "--size=8M",
            "--iodepth=8",
            "--verify=crc32c",
            "--do_verify=1",
        ]);
        run(&mut cmd)
    };
    let good = home(Some(&certs.path().join("qemu-client")));
    let out = fio(good.path(), "randwrite");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}\n{}", node.log());
    assert!(text.contains("err= 0"), "{text}");
    assert!(!text.contains("verify:"), "{text}");
    // What fio wrote is in the image (not all zero).
    let img = std::fs::read(node.image()).unwrap();
    assert!(img[..8 * MIB as usize].iter().any(|&b| b != 0));

    // Another CA's credentials: fio refuses the node's certificate.
    let other = tempfile::tempdir().unwrap();
    certs_init(other.path(), "x", &[]);
    let stranger = home(Some(&other.path().join("qemu-client")));
    let out = fio(stranger.path(), "read");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("certificate verification"), "{err}");
    // No credentials directory: libnbd presents no client certificate, and
    // this export requires one.
    let none = home(None);
    let out = fio(none.path(), "read");
    assert!(!out.status.success());
    wait_log(&node, "the refusal in the log", |l| {
        l.contains("TLS handshake after NBD_OPT_STARTTLS failed") && l.contains("peer=127.0.0.1:")
    });
    assert!(img == std::fs::read(node.image()).unwrap());
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

/// The async kill rounds of async_mirror.rs over mutual TLS: the primary
/// killed at random points leaves a dependency-closed mirror. Rounds
/// alternate the mirror's O_DIRECT parallel apply, and every other pair
/// authenticates with TLS alone (no secret_file on either node).
#[test]
fn an_async_mirror_over_mutual_tls_is_dependency_closed_after_a_primary_kill() {
    let certs = tempfile::tempdir().unwrap();
    // Named like the harness's nodes: TLS alone requires it of the primary.
    certs_init(certs.path(), "primary,mirror", &[]);
    common::kill::primary_kill_rounds(common::kill::kills(8), |round| {
        let mirror = if round % 2 == 0 {
            "direct_io = true\napply_groups = 4\napply_tasks_per_group = 4"
        } else {
            ""
        };
        let tls_alone = (round / 2) % 2 == 1;
        PairBuilder::new(16 * MIB)
            .primary_node(&tls_table(certs.path(), "primary"))
            .mirror_node(&tls_table(certs.path(), "mirror"))
            .mirror_table("mode = \"async\"\npeer_name = \"mirror\"")
            .mirror_volume(mirror)
            .without_secret(tls_alone, tls_alone)
    });
}

/// The mirror killed mid-apply over TLS: dependency closed, and restarted
/// it reconnects (a new TLS session, so a new link key) and catches up.
#[test]
fn an_async_mirror_over_mutual_tls_killed_mid_apply_catches_up() {
    let certs = tempfile::tempdir().unwrap();
    certs_init(certs.path(), "primary,mirror", &[]);
    common::kill::mirror_kill_rounds(common::kill::kills(4), |round| {
        PairBuilder::new(16 * MIB)
            .primary_node(&tls_table(certs.path(), "primary"))
            .mirror_node(&tls_table(certs.path(), "mirror"))
            .mirror_table("mode = \"async\"\npeer_name = \"mirror\"")
            .mirror_volume("direct_io = true\napply_groups = 4\napply_tasks_per_group = 4")
            .without_secret(round % 2 == 1, round % 2 == 1)
    });
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

/// `blockmirror verify` (quick, then full with remote reads) on the pair's
/// primary: both must say identical.
fn verify_identical(pair: &Pair) {
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
}

/// A pair that TLS alone authenticates (no secret_file on either node),
/// the mirror's certificate the files `mirror_cert`.pem/.key from `certs`.
/// The nodes' certificates must name them (`certs init` with the harness's
/// names, `primary,mirror`): with TLS alone the mirror requires it of the
/// primary, and the primary expects `mirror` as `peer_name`.
fn tls_alone_pair(certs: &Path, primary_cert: &str) -> PairBuilder {
    PairBuilder::new(64 * MIB)
        .primary_node(&tls_table(certs, primary_cert))
        .mirror_node(&tls_table(certs, "mirror"))
        .mirror_table("mode = \"sync\"\npeer_name = \"mirror\"")
        .without_secret(true, true)
}

#[test]
fn tls_alone_authenticates_a_link_without_a_secret_file() {
    let certs = tempfile::tempdir().unwrap();
    certs_init(certs.path(), "primary,mirror", &[]);
    let pair = tls_alone_pair(certs.path(), "primary").start();
    for n in [&pair.primary, &pair.mirror] {
        assert!(!std::fs::read_to_string(&n.config)
            .unwrap()
            .contains("secret_file"));
        let out = run_ok(Command::new(BIN).args(["config", "check"]).arg(&n.config));
        assert!(
            out.contains("replication links authenticated with TLS alone (no secret_file)"),
            "{out}"
        );
    }
    assert!(
        pair.mirror.log().contains("accepting replication links")
            && pair.mirror.log().contains("auth=\"tls\""),
        "{}",
        pair.logs()
    );
    qemu_io_ok(
        pair.primary.uri(),
        &["write -P 0x3c 0 2M", "write -P 0xc3 8M 1M", "flush"],
    );
    pair.wait_in_sync(Duration::from_secs(30));
    pair.assert_images_identical();
    // Job connections (verify's hashes, the full verify's remote reads)
    // authenticate the same way.
    verify_identical(&pair);
}

/// With TLS alone the certificate is the primary's only credential: one
/// from the CA that names another node is refused by the mirror (before
/// anything is written), and the primary logs the mirror's reason.
#[test]
fn with_tls_alone_a_primary_whose_certificate_names_another_node_is_refused() {
    let certs = tempfile::tempdir().unwrap();
    certs_init(certs.path(), "primary,mirror,site-c", &[]);
    let pair = tls_alone_pair(certs.path(), "site-c").no_wait().start();
    let log = wait_log(&pair.mirror, "the refusal in the mirror's log", |l| {
        l.contains("its certificate does not name")
    });
    let line = log
        .lines()
        .find(|l| l.contains("its certificate does not name"))
        .unwrap();
    assert!(line.contains("peer=127.0.0.1:"), "{line}");
    assert!(line.contains("primary=primary"), "{line}");
    assert!(
        line.contains("primary \"primary\" (TLS alone authenticates links here)"),
        "{line}"
    );
    wait_log(
        &pair.primary,
        "the mirror's reason in the primary's log",
        |l| l.contains("its certificate does not name \"primary\""),
    );
    assert_ne!(pair.link()["state"], "in_sync");
    assert!(std::fs::read(pair.mirror.image())
        .unwrap()
        .iter()
        .all(|&b| b == 0));
}

#[test]
fn a_secret_on_one_side_only_is_refused_naming_the_peer() {
    let certs = tempfile::tempdir().unwrap();
    certs_init(certs.path(), "site-a,site-b", &[]);
    // (primary without a secret, mirror without one), and the modes the
    // mirror's refusal names: its own, then the primary's.
    for (no_secret, mirror_mode, primary_mode) in [
        (
            (true, false),
            "TLS and the shared secret",
            "TLS alone (no secret_file)",
        ),
        (
            (false, true),
            "TLS alone (no secret_file)",
            "TLS and the shared secret",
        ),
    ] {
        let pair = tls_pair(certs.path(), "site-b", "site-b")
            .without_secret(no_secret.0, no_secret.1)
            .no_wait()
            .start();
        let want = format!(
            "mirror \"mirror\" authenticates links with {mirror_mode}, \
             primary \"primary\" with {primary_mode}"
        );
        let log = wait_log(&pair.mirror, "the refusal in the mirror's log", |l| {
            l.contains("replication peer refused") && l.contains("authenticates links with")
        });
        let line = log
            .lines()
            .find(|l| l.contains("replication peer refused"))
            .unwrap();
        assert!(line.contains("peer=127.0.0.1:"), "{line}");
        assert!(
            line.contains("\"primary\" authenticates links with"),
            "{line}"
        );
        let log = wait_log(&pair.primary, "the refusal in the primary's log", |l| {
            l.contains("mirror link connect failed") && l.contains("authenticates links with")
        });
        let line = log
            .lines()
            .find(|l| l.contains("mirror link connect failed") && l.contains("authenticates"))
            .unwrap();
        assert!(line.contains(&want), "{line}\nwant {want}");
        assert!(
            line.contains(&format!("peer={}", pair.mirror_listen)),
            "{line}"
        );
        assert_ne!(pair.link()["connection"], "connected");
        // Nothing reached the mirror's image.
        assert!(std::fs::read(pair.mirror.image())
            .unwrap()
            .iter()
            .all(|&b| b == 0));
    }
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

// ---------------------------------------------------------------------------
// The admin API: bearer token, HTTPS.

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

/// A standalone node with `[admin_auth]` (and `tls`, a `[tls]` table with
/// HTTPS on the admin port, if given).
fn auth_node(open_reads: bool, tls: Option<&Path>) -> TestNode {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("admin.token"), format!("{TOKEN}\n")).unwrap();
    std::fs::write(dir.path().join("secret.key"), format!("{}\n", new_secret())).unwrap();
    // `listen` and a secret: demote (the change the tests make) needs them.
    let listen = format!("127.0.0.1:{}", free_port());
    let admin: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let port = free_port();
    let img = dir.path().join("db.img");
    let tls_text = tls.map_or(String::new(), |c| {
        format!(
            "[tls]\nca = \"{0}/ca.pem\"\ncert = \"{0}/site-a.pem\"\nkey = \"{0}/site-a.key\"\n",
            c.display()
        )
    });
    let text = format!(
        "node = \"site-a\"\nadmin = \"{admin}\"\nlisten = \"{listen}\"\nsecret_file = \"secret.key\"\n[admin_auth]\ntoken_file = \"admin.token\"\n\
         open_reads = {open_reads}\n{tls_text}\n[[volume]]\nname = \"db\"\npath = \"{}\"\nsize = {}\n\
         role = \"primary\"\nnbd = \"127.0.0.1:{port}\"\n",
        img.display(),
        16 * MIB
    );
    TestNode::from_config_with(
        dir,
        &text,
        admin,
        vec![format!("nbd://127.0.0.1:{port}/db")],
        vec![img],
        Vec::new(),
        tls.is_some(),
    )
}

#[test]
fn the_admin_api_wants_a_bearer_token_for_changes_and_logs_refusals() {
    let node = auth_node(true, None);
    let a = node.admin;
    // Reads are open.
    assert_eq!(http_get(a, "/status").unwrap().0, 200);
    assert_eq!(http_get(a, "/metrics").unwrap().0, 200);
    // Changes: 401 without a token, 403 with a wrong one, through with it.
    let (code, _) = http_post(a, "/volumes/db/demote").unwrap();
    assert_eq!(code, 401);
    let wrong = "Authorization: Bearer not-the-token-at-all";
    let (code, _) = http_request(a, "POST", "/volumes/db/demote", &[wrong], "{}").unwrap();
    assert_eq!(code, 403);
    let right = format!("Authorization: Bearer {TOKEN}");
    let (code, body) = http_request(a, "POST", "/admin/reload-tls", &[&right], "").unwrap();
    assert_eq!(
        code, 409,
        "past the token, refused for want of [tls]: {body}"
    );
    let log = wait_log(&node, "both refusals in the log", |l| {
        l.contains("admin request refused: no bearer token")
            && l.contains("admin request refused: wrong token")
    });
    for l in log.lines().filter(|l| l.contains("admin request refused")) {
        assert!(l.contains("peer=127.0.0.1:"), "{l}");
        assert!(l.contains("path=/volumes/db/demote"), "{l}");
    }
    assert_eq!(node.status_json()["volumes"][0]["role"], "primary");

    // The CLI: refused without the token file, obeyed with it.
    let addr = a.to_string();
    let out = cli(&["demote", "db", "--admin", &addr]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token_file = node.dir.path().join("admin.token");
    let out = cli(&[
        "demote",
        "db",
        "--admin",
        &addr,
        "--token-file",
        token_file.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(node.status_json()["volumes"][0]["role"], "mirror");
}

#[test]
fn closed_reads_need_the_token_and_the_cli_finds_it_in_the_config() {
    let node = auth_node(false, None);
    assert_eq!(http_get(node.admin, "/status").unwrap().0, 401);
    let right = format!("Authorization: Bearer {TOKEN}");
    let (code, body) = http_request(node.admin, "GET", "/status", &[&right], "").unwrap();
    assert_eq!(code, 200, "{body}");
    // Run from a directory whose blockmirror.toml names the token file:
    // no flags needed.
    std::fs::copy(&node.config, node.dir.path().join("blockmirror.toml")).unwrap();
    let out = run(Command::new(BIN)
        .args(["status", "--json"])
        .current_dir(node.dir.path()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"db\""));
}

#[test]
fn https_on_the_admin_port_with_the_node_certificate() {
    require_tool("curl");
    let certs = tempfile::tempdir().unwrap();
    certs_init(certs.path(), "site-a", &[]);
    let node = auth_node(true, Some(certs.path()));
    let addr = node.admin.to_string();
    let ca = certs.path().join("ca.pem");
    let token_file = node.dir.path().join("admin.token");
    // The CLI with --ca (and the token for a change).
    let out = cli(&[
        "status",
        "--json",
        "--admin",
        &addr,
        "--ca",
        ca.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&[
        "demote",
        "db",
        "--admin",
        &addr,
        "--ca",
        ca.to_str().unwrap(),
        "--token-file",
        token_file.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without --ca the CLI speaks plain HTTP to a TLS port: an error.
    let out = cli(&["status", "--admin", &addr]);
    assert!(!out.status.success());
    // A CA that did not sign the node's certificate: refused.
    let other = tempfile::tempdir().unwrap();
    certs_init(other.path(), "x", &[]);
    let bad_ca = other.path().join("ca.pem");
    let out = cli(&["status", "--admin", &addr, "--ca", bad_ca.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("TLS"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // curl, for Prometheus-style scrapers.
    let body = run_ok(Command::new("curl").args([
        "-sf",
        "--cacert",
        ca.to_str().unwrap(),
        &format!("https://{addr}/metrics"),
    ]));
    assert!(body.contains("blockmirror_"), "{body}");
    wait_log(&node, "the plain-HTTP refusal in the log", |l| {
        l.contains("admin connection refused: TLS handshake failed")
            && l.contains("peer=127.0.0.1:")
    });
}

/// curl over HTTPS to `addr` trusting `ca`, with extra arguments (a client
/// certificate, a method); returns (curl succeeded, HTTP code).
fn curl_code(ca: &Path, addr: &str, path: &str, extra: &[&str]) -> (bool, String) {
    let out = run(Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(ca)
        .args(extra)
        .arg(format!("https://{addr}{path}")));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn a_client_certificate_from_the_ca_authorizes_admin_requests_instead_of_a_token() {
    require_tool("curl");
    let certs = tempfile::tempdir().unwrap();
    certs_init(certs.path(), "site-a,ops", &[]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret.key"), format!("{}\n", new_secret())).unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let admin: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let port = free_port();
    let img = dir.path().join("db.img");
    // No token file: client certificates only, reads closed too.
    let text = format!(
        "node = \"site-a\"\nadmin = \"{admin}\"\nlisten = \"{listen}\"\nsecret_file = \"secret.key\"\n\
         [admin_auth]\nclient_certs = true\nopen_reads = false\n\
         [tls]\nca = \"{0}/ca.pem\"\ncert = \"{0}/site-a.pem\"\nkey = \"{0}/site-a.key\"\n\
         [[volume]]\nname = \"db\"\npath = \"{1}\"\nsize = {2}\nrole = \"primary\"\nnbd = \"127.0.0.1:{port}\"\n",
        certs.path().display(),
        img.display(),
        16 * MIB
    );
    let node = TestNode::from_config_with(
        dir,
        &text,
        admin,
        vec![format!("nbd://127.0.0.1:{port}/db")],
        vec![img],
        Vec::new(),
        true,
    );
    assert!(node.log().contains("client_certs=true"), "{}", node.log());
    let addr = admin.to_string();
    let ca = certs.path().join("ca.pem");
    let (ops_cert, ops_key) = (certs.path().join("ops.pem"), certs.path().join("ops.key"));
    let with_ops = [
        "--cert",
        ops_cert.to_str().unwrap(),
        "--key",
        ops_key.to_str().unwrap(),
    ];

    // Without a certificate: 401 on reads and changes, logged with the peer.
    assert_eq!(curl_code(&ca, &addr, "/status", &[]).1, "401");
    assert_eq!(
        curl_code(&ca, &addr, "/admin/reload-tls", &["-X", "POST"]).1,
        "401"
    );
    // A token is no use to this node: 403.
    let (_, code) = curl_code(
        &ca,
        &addr,
        "/admin/reload-tls",
        &[
            "-X",
            "POST",
            "-H",
            &format!("Authorization: Bearer {TOKEN}"),
        ],
    );
    assert_eq!(code, "403");
    let log = wait_log(&node, "the refusals in the log", |l| {
        l.contains("admin request refused: no client certificate")
            && l.contains("admin request refused: a token, but")
    });
    for l in log.lines().filter(|l| l.contains("admin request refused")) {
        assert!(l.contains("peer=127.0.0.1:"), "{l}");
    }

    // With a certificate from the CA: through (the qemu-client one too).
    assert_eq!(curl_code(&ca, &addr, "/status", &with_ops).1, "200");
    let (_, code) = curl_code(
        &ca,
        &addr,
        "/admin/reload-tls",
        &[&with_ops[..], &["-X", "POST"]].concat(),
    );
    assert_eq!(code, "200");
    let qc = certs.path().join("qemu-client");
    let (qcert, qkey) = (qc.join("client-cert.pem"), qc.join("client-key.pem"));
    let with_qemu = [
        "--cert",
        qcert.to_str().unwrap(),
        "--key",
        qkey.to_str().unwrap(),
    ];
    assert_eq!(curl_code(&ca, &addr, "/metrics", &with_qemu).1, "200");

    // A certificate from another CA: the TLS handshake fails (curl gets no
    // HTTP answer), logged with the peer.
    let other = tempfile::tempdir().unwrap();
    certs_init(other.path(), "ops", &[]);
    let (bad_cert, bad_key) = (other.path().join("ops.pem"), other.path().join("ops.key"));
    let (ok, code) = curl_code(
        &ca,
        &addr,
        "/admin/reload-tls",
        &[
            "-X",
            "POST",
            "--cert",
            bad_cert.to_str().unwrap(),
            "--key",
            bad_key.to_str().unwrap(),
        ],
    );
    assert!(
        !ok && code == "000",
        "another CA's certificate: {ok} {code}"
    );
    wait_log(&node, "the stranger's refusal in the log", |l| {
        l.lines().any(|l| {
            l.contains("admin connection refused: TLS handshake failed")
                && l.contains("peer=127.0.0.1:")
        })
    });

    // The CLI: --ca with --cert/--key; refused without them.
    let ca_s = ca.to_str().unwrap();
    let out = cli(&["status", "--json", "--admin", &addr, "--ca", ca_s]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&[
        &["demote", "db", "--admin", &addr, "--ca", ca_s][..],
        &with_ops,
    ]
    .concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&[
        &["status", "--json", "--admin", &addr, "--ca", ca_s][..],
        &with_ops,
    ]
    .concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["volumes"][0]["role"], "mirror");
    // --cert without --ca: a clear error before any request.
    let out = cli(&[&["status", "--admin", &addr][..], &with_ops].concat());
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--ca"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Run in the node's directory, the CLI presents the node's own
    // certificate (client_certs, no token_file).
    std::fs::copy(&node.config, node.dir.path().join("blockmirror.toml")).unwrap();
    let out = run(Command::new(BIN)
        .args(["status", "--json", "--admin", &addr])
        .current_dir(node.dir.path()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
