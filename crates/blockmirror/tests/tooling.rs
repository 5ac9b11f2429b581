//! `blockmirror config check`, `man` and `completions`; and, when
//! `BLOCKMIRROR_DEB` names a .deb built by scripts/deb.sh, that package
//! unpacked with `dpkg -x` into a clean directory runs `--version`.

mod common;

use std::process::Command;

use common::*;

#[test]
fn config_check_validates_and_says_what_it_would_serve() {
    let node = TestNode::start(&[VolumeSpec::new("db", 1 << 20)]);
    let out = run_ok(
        Command::new(BIN)
            .args(["config", "check"])
            .arg(&node.config),
    );
    assert!(out.contains(": valid"), "{out}");
    assert!(out.contains("node test"), "{out}");
    assert!(out.contains(&format!("admin HTTP {}", node.admin)), "{out}");
    assert!(out.contains("volume db: primary 1.0 MiB"), "{out}");
    assert!(out.contains(node.uri()), "{out}");

    let bad = node.dir.path().join("bad.toml");
    std::fs::write(&bad, "node = \"x\"\nadmin = \"nope\"\n").unwrap();
    let out = cli(&["config", "check", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml") && err.contains("admin"), "{err}");
}

#[test]
fn man_pages_and_completions_come_from_the_cli_definition() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_ok(Command::new(BIN).arg("man").arg(dir.path()));
    for page in [
        "blockmirror.1",
        "blockmirror-serve.1",
        "blockmirror-events.1",
        "blockmirror-status.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join(page))
            .unwrap_or_else(|e| panic!("{page}: {e}; wrote:\n{out}"));
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{page}: {text}"
        );
    }
    let serve = std::fs::read_to_string(dir.path().join("blockmirror-serve.1")).unwrap();
    assert!(serve.contains("config"), "{serve}");
    for shell in ["bash", "zsh", "fish"] {
        let text = run_ok(Command::new(BIN).args(["completions", shell]));
        assert!(
            text.contains("blockmirror") && text.contains("events"),
            "{shell}: {text}"
        );
    }
}

#[test]
fn the_debian_package_unpacks_and_runs() {
    let Some(deb) = std::env::var_os("BLOCKMIRROR_DEB") else {
        eprintln!(
            "SKIPPED: BLOCKMIRROR_DEB unset (scripts/deb.sh builds the package and runs this test)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    run_ok(Command::new("dpkg").arg("-x").arg(&deb).arg(dir.path()));
    let root = dir.path();
    for f in [
        "usr/bin/blockmirror",
        "lib/systemd/system/blockmirror@.service",
        "usr/share/man/man1/blockmirror.1.gz",
        "usr/share/man/man1/blockmirror-serve.1.gz",
        "usr/share/bash-completion/completions/blockmirror",
        "usr/share/zsh/vendor-completions/_blockmirror",
        "usr/share/fish/vendor_completions.d/blockmirror.fish",
    ] {
        assert!(root.join(f).is_file(), "{f} is in the package");
    }
    let out = run_ok(Command::new(root.join("usr/bin/blockmirror")).arg("--version"));
    assert!(out.starts_with("blockmirror "), "{out}");
    eprintln!("{}", out.trim());
}
