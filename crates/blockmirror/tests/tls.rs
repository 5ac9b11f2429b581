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
