//! `blockmirror demo --cluster`: cluster mode on loopback. A 3-member etcd
//! (testkit's `EtcdCluster`) and three `blockmirror serve` processes, sites
//! a, b and c, each configured with the other two as its volume's mirrors,
//! so whichever site is primary mirrors synchronously to the rest. Failover
//! on request: stop the primary's process (the printed `kill` line) and
//! watch `cluster status`; a mirror is promoted once its lease lapses.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use blockmirror_testkit::etcd::{EtcdCluster, EtcdOpts};
use tokio_util::sync::CancellationToken;

use crate::{admin, cancel_on_signals, free_port};

const SITES: [&str; 3] = ["a", "b", "c"];

struct Site {
    name: &'static str,
    admin: std::net::SocketAddr,
    nbd: String,
    child: Child,
}

pub async fn run(dir: &Path, size: &str) -> Result<()> {
    if Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .map(|s| !s.success())
        .unwrap_or(true)
    {
        bail!("demo --cluster needs etcd: install Debian's etcd-server (scripts/install-deps.sh)");
    }
    let dir = crate::demo_dir(dir)?;
    println!("starting a 3-member etcd on loopback ...");
    let etcd = EtcdCluster::start(EtcdOpts::new(dir.join("etcd"), 3))
        .map_err(|e| anyhow::anyhow!("etcd: {e}"))?;
    let endpoints = etcd.endpoints();
    let quoted: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    let mut listen = Vec::new();
    for i in 0..SITES.len() {
        listen.push(free_port(7710 + i as u16)?);
    }
    let exe = std::env::current_exe()?;
    let mut sites = Vec::new();
    for (i, name) in SITES.iter().enumerate() {
        let (admin_port, nbd_port) = (free_port(7790 + i as u16)?, free_port(10820 + i as u16)?);
        let mirrors: String = listen
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, p)| format!("\n[[volume.mirror]]\npeer = \"127.0.0.1:{p}\"\n"))
            .collect();
        let text = format!(
            r#"# blockmirror demo --cluster: site {name}. Roles are decided through etcd:
# whichever site holds the volume's key is its primary and mirrors to the
# other two; when that site is lost, an in-step mirror is promoted.
node = "site-{name}"
listen = "127.0.0.1:{}"
admin = "127.0.0.1:{admin_port}"
secret_file = "secret.key"

[cluster]
etcd = [{}]
lease_ttl = "3s"
auto_promote = "sync_only"
site = "{name}"
# Volumes declared in etcd (`blockmirror cluster apply`): their images, and
# the address their exports listen on (one loopback address per site, since
# a declared volume has one port on every site).
volume_dir = "site-{name}/declared"
nbd_host = "127.0.0.{}"

[[volume]]
name = "demo"
path = "site-{name}/demo.img"
size = "{size}"
role = "{}"
nbd = "127.0.0.1:{nbd_port}"
mirror_timeout = "3s"
{mirrors}"#,
            listen[i],
            quoted.join(", "),
            i + 1,
            if i == 0 { "primary" } else { "mirror" },
        );
        let cfg = dir.join(format!("site-{name}.toml"));
        std::fs::write(&cfg, text).with_context(|| format!("writing {}", cfg.display()))?;
        let log = std::fs::File::create(dir.join(format!("site-{name}.log")))?;
        let child = Command::new(&exe)
            .args(["serve", "-c"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting a site")?;
        sites.push(Site {
            name,
            admin: format!("127.0.0.1:{admin_port}").parse()?,
            nbd: format!("nbd://127.0.0.1:{nbd_port}/demo"),
            child,
        });
    }
    // Ready: every site answers /status and one of them holds the key.
    let deadline = Instant::now() + Duration::from_secs(60);
    let primary = loop {
        let mut found = None;
        let mut all = true;
        for s in &sites {
            match admin::fetch_status(s.admin).await {
                Ok(st) => {
                    if st
                        .volumes
                        .first()
                        .is_some_and(|v| v.role == "primary" && v.epoch.unwrap_or(0) > 0)
                    {
                        found = Some(s.name);
                    }
                }
                Err(_) => all = false,
            }
        }
        if let (true, Some(p)) = (all, found) {
            break p;
        }
        if Instant::now() > deadline {
            stop(&mut sites);
            bail!(
                "the sites did not come up within 60 s; see {}/site-*.log",
                dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let eps = endpoints.join(",");
    println!(
        "blockmirror demo --cluster is running in {}:",
        dir.display()
    );
    println!();
    println!("  etcd   {eps}");
    for s in &sites {
        println!(
            "  site {}  {}  admin http://{}/status  pid {}{}",
            s.name,
            s.nbd,
            s.admin,
            s.child.id(),
            if s.name == primary {
                "   <- primary"
            } else {
                ""
            }
        );
    }
    let p = sites.iter().find(|s| s.name == primary).expect("found");
    println!();
    println!("Try:");
    println!("  blockmirror cluster status --etcd {eps}");
    println!(
        "  qemu-io -f raw -c 'write -P 0xab 0 1M' -c flush {}",
        p.nbd
    );
    println!(
        "  kill -STOP {}     # lose site {} (a partition): a mirror is promoted after its lease (3 s)",
        p.child.id(),
        p.name
    );
    println!(
        "  kill -CONT {}     # it comes back, finds the newer epoch and rejoins as a mirror",
        p.child.id()
    );
    println!("  blockmirror status --admin {}", p.admin);
    let more_port = free_port(10900)?;
    let decl = dir.join("volumes.toml");
    std::fs::write(
        &decl,
        format!(
            "# Volumes declared in etcd: `blockmirror cluster apply` this file and every\n\
             # site it names serves the volume at once.\n\
             [[volume]]\nname = \"more\"\nsize = \"{size}\"\nprimary = \"site-b\"\n\
             mirrors = [{{ node = \"site-a\" }}, {{ node = \"site-c\", mode = \"async\" }}]\n\
             nbd_port = {more_port}\n"
        ),
    )
    .with_context(|| format!("writing {}", decl.display()))?;
    println!(
        "  blockmirror cluster apply {} --etcd {eps}   # one more volume, declared in etcd",
        decl.display()
    );
    println!("  nbdinfo nbd://127.0.0.2:{more_port}/more     # served by site b once applied");
    println!("  blockmirror cluster events --etcd {eps}      # follow the changes");
    println!();
    println!("Press Ctrl-C to stop.");
    let signal = CancellationToken::new();
    cancel_on_signals(signal.clone())?;
    signal.cancelled().await;
    stop(&mut sites);
    drop(etcd);
    println!("stopped");
    Ok(())
}

/// SIGTERM to every site (a stopped one is continued first), then waits.
fn stop(sites: &mut [Site]) {
    for s in sites.iter() {
        let pid = s.child.id().to_string();
        let _ = Command::new("kill").args(["-CONT", &pid]).status();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
    }
    for s in sites.iter_mut() {
        let _ = s.child.wait();
    }
}
