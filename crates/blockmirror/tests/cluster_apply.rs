//! Volumes declared in etcd (issue 17): three `blockmirror serve` nodes
//! whose configs hold no volume at all, a 3-member etcd on loopback, and
//! `blockmirror cluster apply FILE`, as an operator runs it.
//!
//! - The nodes named in a declaration serve it at once: the primary's
//!   export takes qemu-io's writes, the mirrors come in sync.
//! - A second apply adds a volume to running nodes (no restart), leaves the
//!   rest alone, and a size change is refused before anything is written.
//! - A declared volume fails over like a configured one (SIGSTOP of its
//!   primary), `cluster events` reports the key's release and the new
//!   primary, and a restarted node serves its declared volumes again.
//!
//! Needs the `etcd` binary (scripts/install-deps.sh installs etcd-server);
//! without it the test says so and passes.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use blockmirror_testkit::etcd::{EtcdCluster, EtcdOpts};
use common::*;

struct Site {
    name: &'static str,
    node: TestNode,
}

impl Site {
    fn volume(&self, name: &str) -> Option<serde_json::Value> {
        self.node.status_json()["volumes"]
            .as_array()?
            .iter()
            .find(|v| v["name"] == name)
            .cloned()
    }
}

fn cli_ok(args: &[&str]) -> String {
    let o = cli(args);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "blockmirror {args:?} failed:\n{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

#[test]
fn declared_volumes_are_served_where_etcd_assigns_them_and_fail_over() {
    if !have_etcd() {
        eprintln!("SKIP: no etcd binary (install etcd-server: scripts/install-deps.sh)");
        return;
    }
    require_tool("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdCluster::start(EtcdOpts::new(dir.path().join("etcd"), 3)).unwrap();
    let endpoints: Vec<String> = etcd.endpoints().to_vec();
    let etcd_arg = endpoints.join(",");
    let etcd_toml = endpoints
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let secret = new_secret();
    let mut sites = Vec::new();
    // One NBD port per volume on every node (as DRBD gives a resource one
    // port): on one machine each node exports on its own loopback address.
    for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
        let ndir = tempfile::tempdir().unwrap();
        std::fs::write(ndir.path().join("secret.key"), format!("{secret}\n")).unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let text = format!(
            "node = \"{name}\"\nlisten = \"127.0.0.1:{}\"\nadmin = \"{admin}\"\n\
             secret_file = \"secret.key\"\n\
             [cluster]\netcd = [{etcd_toml}]\nlease_ttl = \"2s\"\nnbd_host = \"127.0.0.{}\"\n",
            free_port(),
            i + 1
        );
        let node = TestNode::from_config(ndir, &text, admin, Vec::new(), Vec::new(), Vec::new());
        sites.push(Site { name, node });
    }
    let guard = Logs(&sites);

    // Every node has registered its address once its lease is granted.
    wait_for("three nodes in etcd", Duration::from_secs(30), || {
        let out = cli_ok(&["cluster", "status", "--etcd", &etcd_arg, "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        (v["nodes"].as_array()?.len() == 3).then_some(())
    });

    let (p_db, p_app1, p_app2, p_late) = (free_port(), free_port(), free_port(), free_port());
    let decl = dir.path().join("volumes.toml");
    let first = format!(
        "[[volume]]\nname = \"db\"\nsize = \"32MiB\"\nprimary = \"a\"\nnbd_port = {p_db}\n\
         mirrors = [{{ node = \"b\" }}, {{ node = \"c\" }}]\noptions = {{ mirror_timeout = \"2s\" }}\n\
         [[volume]]\nname = \"app1\"\nsize = \"16MiB\"\nprimary = \"b\"\nnbd_port = {p_app1}\n\
         consistency_group = \"app\"\nmirrors = [{{ node = \"c\" }}]\n\
         [[volume]]\nname = \"app2\"\nsize = \"16MiB\"\nprimary = \"b\"\nnbd_port = {p_app2}\n\
         consistency_group = \"app\"\nmirrors = [{{ node = \"c\" }}]\n"
    );
    std::fs::write(&decl, &first).unwrap();
    let decl_s = decl.to_str().unwrap();
    let dry = cli_ok(&["cluster", "apply", decl_s, "--etcd", &etcd_arg, "--dry-run"]);
    assert!(dry.contains("added (would be): db, app1, app2"), "{dry}");
    let out = cli_ok(&["cluster", "apply", decl_s, "--etcd", &etcd_arg]);
    assert!(out.contains("added: db, app1, app2"), "{out}");

    // Served where declared: a is db's primary, b the group's; mirrors in sync.
    let in_sync = |s: &Site, vol: &str| {
        let v = s.volume(vol)?;
        let m = v["mirrors"].as_array()?;
        (v["role"] == "primary" && !m.is_empty() && m.iter().all(|m| m["state"] == "in_sync"))
            .then_some(v["epoch"].as_u64()?)
    };
    let e1 = wait_for("db primary on a, in sync", Duration::from_secs(60), || {
        in_sync(&sites[0], "db")
    });
    for vol in ["app1", "app2"] {
        wait_for(
            &format!("{vol} primary on b"),
            Duration::from_secs(60),
            || in_sync(&sites[1], vol),
        );
    }
    assert!(sites[0].volume("app1").is_none(), "a is not named by app1");
    assert_eq!(sites[2].volume("db").unwrap()["role"], "mirror");
    let db_a = format!("nbd://127.0.0.1:{p_db}/db");
    assert_eq!(sites[0].volume("db").unwrap()["nbd"], db_a);
    qemu_io_ok(&db_a, &["write -P 0x5d 0 1M", "flush"]);

    // A second apply: a new volume on running nodes, the others unchanged;
    // a resize is refused and writes nothing.
    let second = format!(
        "{first}[[volume]]\nname = \"late\"\nsize = \"8MiB\"\nprimary = \"c\"\nnbd_port = {p_late}\n\
         mirrors = [{{ node = \"a\", mode = \"async\" }}]\n"
    );
    std::fs::write(&decl, &second).unwrap();
    let out = cli_ok(&["cluster", "apply", decl_s, "--etcd", &etcd_arg]);
    assert!(out.contains("added: late"), "{out}");
    assert!(out.contains("unchanged: db, app1, app2"), "{out}");
    wait_for(
        "late served by c, mirrored to a",
        Duration::from_secs(60),
        || in_sync(&sites[2], "late"),
    );
    qemu_io_ok(
        &format!("nbd://127.0.0.3:{p_late}/late"),
        &["write -P 0x11 0 64k"],
    );
    std::fs::write(&decl, second.replace("\"8MiB\"", "\"16MiB\"")).unwrap();
    let o = cli(&["cluster", "apply", decl_s, "--etcd", &etcd_arg]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("not resized"), "{err}");

    // `cluster events`, then the primary of db frozen: its key is released
    // and another node takes db at a newer epoch, with the write.
    let mut events = Command::new(env!("CARGO_BIN_EXE_blockmirror"))
        .args(["cluster", "events", "--etcd", &etcd_arg, "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // It says on stderr when its watch is in place.
    let mut err_lines = BufReader::new(events.stderr.take().unwrap()).lines();
    let watching = err_lines.next().unwrap().unwrap();
    assert!(watching.starts_with("watching /blockmirror/"), "{watching}");
    let lines = BufReader::new(events.stdout.take().unwrap()).lines();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<serde_json::Value>::new()));
    let reader = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&l) {
                    seen.lock().unwrap().push(v);
                }
            }
        })
    };
    let stop = |sig: &str, s: &Site| {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &s.node.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    };
    stop("STOP", &sites[0]);
    let (new, e2) = wait_for("db promoted elsewhere", Duration::from_secs(30), || {
        sites[1..].iter().find_map(|s| {
            let v = s.volume("db")?;
            let e = v["epoch"].as_u64()?;
            (v["role"] == "primary" && e > e1).then_some((s.name, e))
        })
    });
    let new_site = sites.iter().find(|s| s.name == new).unwrap();
    let uri = new_site.volume("db").unwrap()["nbd"]
        .as_str()
        .unwrap()
        .to_owned();
    qemu_io_ok(&uri, &["read -P 0x5d 0 1M"]);
    wait_for(
        "events: key released, new primary",
        Duration::from_secs(20),
        || {
            let seen = seen.lock().unwrap();
            let released = seen.iter().any(|e| {
                e["kind"] == "primary_released" && e["volume"] == "db" && e["node"] == "a"
            });
            let took = seen
                .iter()
                .any(|e| e["kind"] == "primary" && e["volume"] == "db" && e["node"] == new);
            (released && took).then_some(())
        },
    );
    let _ = events.kill();
    let _ = events.wait();
    let _ = reader.join();
    let st: serde_json::Value = serde_json::from_str(&cli_ok(&[
        "cluster", "status", "--etcd", &etcd_arg, "--json",
    ]))
    .unwrap();
    let db = st["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["volume"] == "db")
        .unwrap();
    assert_eq!(db["primary"], new);
    assert_eq!(db["epoch"].as_u64(), Some(e2));
    assert_eq!(st["declared"].as_array().unwrap().len(), 4);
    stop("CONT", &sites[0]);
    drop(guard);

    // A node restarted serves its declared volumes again, from etcd.
    let c = &mut sites[2];
    c.node.stop_with("KILL");
    c.node.restart();
    for vol in ["db", "app1", "app2", "late"] {
        wait_for(
            &format!("c serves {vol} again"),
            Duration::from_secs(60),
            || c.volume(vol).map(|_| ()),
        );
    }
    wait_for("late primary on c again", Duration::from_secs(60), || {
        let v = c.volume("late")?;
        (v["role"] == "primary").then_some(())
    });
    qemu_io_ok(
        &format!("nbd://127.0.0.3:{p_late}/late"),
        &["read -P 0x11 0 64k"],
    );
    drop(etcd);
}

/// On a panic: the last lines of every node's log.
struct Logs<'a>(&'a [Site]);

impl Drop for Logs<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for s in self.0 {
                let log = s.node.log();
                let tail: Vec<&str> = log.lines().rev().take(400).collect();
                eprintln!("--- node {} (last lines) ---", s.name);
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}
