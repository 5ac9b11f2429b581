//! `blockmirror cluster status | apply | events`: what etcd holds of a
//! cluster-mode deployment, volumes declared there, and its changes.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use blockmirror_node::cluster::client;
use blockmirror_node::daemon::config;

/// Where etcd is: `--etcd`, or `[cluster]` of a node config.
#[derive(Args)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated (default: `[cluster] etcd` of
    /// --config).
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// Key prefix with --etcd (default: /blockmirror; with --config, its
    /// `[cluster] prefix`).
    #[arg(long)]
    prefix: Option<String>,
    /// A node config to take `[cluster]` from.
    #[arg(long, short, default_value = "blockmirror.toml")]
    config: PathBuf,
}

impl EtcdArgs {
    /// (endpoints, prefix).
    fn resolve(self) -> Result<(Vec<String>, String)> {
        if !self.etcd.is_empty() {
            let prefix = self.prefix.unwrap_or_else(|| "/blockmirror".into());
            return Ok((self.etcd, prefix));
        }
        let c = config::NodeConfig::load(&self.config)
            .with_context(|| format!("no --etcd given; reading {}", self.config.display()))?;
        let cl = c
            .cluster
            .with_context(|| format!("{} has no [cluster] table", self.config.display()))?;
        Ok((cl.etcd, self.prefix.unwrap_or(cl.prefix)))
    }
}

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Every volume of the cluster: its primary node, fencing epoch,
    /// published generation and mirrors; the declared volumes; and the live
    /// nodes.
    Status {
        #[command(flatten)]
        etcd: EtcdArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Declare volumes in etcd from FILE (TOML, `[[volume]]` tables with
    /// name, size, primary, mirrors; docs/CLUSTER.md): every node named in
    /// one serves it. Checked as each node would check it, and written in
    /// one transaction.
    Apply {
        file: PathBuf,
        #[command(flatten)]
        etcd: EtcdArgs,
        /// Delete the declarations of volumes FILE does not list (their
        /// nodes serve them until they restart).
        #[arg(long)]
        prune: bool,
        /// Check and show what would change; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Follow the cluster's changes in etcd (nodes up and down, primaries
    /// and epochs, records, mirror reports, declarations), one line each,
    /// until interrupted.
    Events {
        #[command(flatten)]
        etcd: EtcdArgs,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
    },
}

pub async fn run(cmd: ClusterCommand) -> Result<()> {
    match cmd {
        ClusterCommand::Status { etcd, json } => status(etcd, json).await,
        ClusterCommand::Apply {
            file,
            etcd,
            prune,
            dry_run,
            json,
        } => apply(&file, etcd, prune, dry_run, json).await,
        ClusterCommand::Events { etcd, json, count } => events(etcd, json, count).await,
    }
}

async fn status(etcd: EtcdArgs, json: bool) -> Result<()> {
    let (endpoints, prefix) = etcd.resolve()?;
    let view = client::read_view(&endpoints, &prefix)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
        return Ok(());
    }
    println!(
        "{:<16} {:<12} {:>6} {:<18} {:<14} MIRRORS",
        "VOLUME", "PRIMARY", "EPOCH", "GENERATION", "SYNC"
    );
    for v in &view.volumes {
        let primary = v
            .primary
            .clone()
            .unwrap_or_else(|| format!("none (was {})", v.recorded_primary));
        let mirrors: Vec<String> = v
            .mirrors
            .iter()
            .map(|m| format!("{}:{}", m.node, m.data))
            .collect();
        println!(
            "{:<16} {:<12} {:>6} {:<18} {:<14} {}",
            v.volume,
            primary,
            v.epoch,
            v.generation,
            v.sync_mirrors.join(","),
            mirrors.join(" ")
        );
    }
    if !view.declared.is_empty() {
        println!();
        println!(
            "{:<16} {:>14} {:>8} {:<12} NODES (first: initial primary)",
            "DECLARED", "SIZE", "NBD PORT", "GROUP"
        );
        for d in &view.declared {
            let nodes: Vec<String> = std::iter::once(d.primary.clone())
                .chain(d.mirrors.iter().map(|m| format!("{}({})", m.node, m.mode)))
                .collect();
            println!(
                "{:<16} {:>14} {:>8} {:<12} {}",
                d.name,
                d.size,
                d.nbd_port,
                d.consistency_group.as_deref().unwrap_or("-"),
                nodes.join(" ")
            );
        }
    }
    let nodes: Vec<String> = view
        .nodes
        .iter()
        .map(|n| format!("{} (site {}, admin {})", n.node, n.site, n.admin))
        .collect();
    println!("nodes: {}", nodes.join(", "));
    Ok(())
}

async fn apply(file: &Path, etcd: EtcdArgs, prune: bool, dry_run: bool, json: bool) -> Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let (endpoints, prefix) = etcd.resolve()?;
    let r = client::apply(&endpoints, &prefix, &text, prune, dry_run)
        .await
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let list = |v: &[String]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(", ")
        }
    };
    let verb = if dry_run { " (would be)" } else { "" };
    println!("added{verb}: {}", list(&r.added));
    println!("changed{verb}: {}", list(&r.changed));
    println!("unchanged: {}", list(&r.unchanged));
    if !r.absent.is_empty() {
        if prune {
            println!("deleted{verb}: {}", list(&r.absent));
        } else {
            println!(
                "declared in etcd, not in {} (kept; --prune deletes them): {}",
                file.display(),
                list(&r.absent)
            );
        }
    }
    if !r.changed.is_empty() || (prune && !r.absent.is_empty()) {
        println!(
            "note: a served volume keeps its old declaration until its nodes restart; new \
             volumes are served at once"
        );
    }
    for v in &r.volumes {
        println!(
            "  {}: nbd port {} on {}",
            v.name,
            v.nbd_port,
            v.nodes().collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

async fn events(etcd: EtcdArgs, json: bool, count: Option<u64>) -> Result<()> {
    use std::io::Write as _;
    let (endpoints, prefix) = etcd.resolve()?;
    let mut left = count;
    let mut failed = None;
    let ready = |rev| eprintln!("watching {prefix}/ from etcd revision {rev}");
    let watch = client::watch_events(&endpoints, &prefix, ready, |e| {
        let line = if json {
            serde_json::to_string(&e).unwrap_or_default()
        } else {
            format!("{} {}", e.time, e.text)
        };
        let mut out = std::io::stdout().lock();
        if let Err(err) = writeln!(out, "{line}").and_then(|()| out.flush()) {
            failed = Some(err);
            return false;
        }
        match &mut left {
            Some(n) => {
                *n -= 1;
                *n > 0
            }
            None => true,
        }
    });
    tokio::select! {
        r = watch => r.map_err(|e| anyhow::anyhow!(e))?,
        _ = tokio::signal::ctrl_c() => {}
    }
    match failed {
        // A closed pipe (`| head`) ends it quietly.
        Some(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}
