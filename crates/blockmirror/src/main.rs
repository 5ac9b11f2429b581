//! `blockmirror`: the command-line front of a blockmirror node.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::info;

use blockmirror_node::daemon::config::{self, NodeConfig};
use blockmirror_node::daemon::node::Node;
use blockmirror_node::daemon::{admin, status};

mod cluster_cli;
mod cluster_demo;
mod drill;

/// mimalloc keeps large buffers (1 MiB request payloads) for reuse instead of
/// mapping and unmapping them per request as glibc's malloc does above its
/// mmap threshold: page faults and page zeroing were ~8% of a 1 MiB write
/// profile. See docs/BENCHMARKS.md.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "blockmirror",
    version,
    about = "Block-level remote mirroring over NBD"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// The admin API's bearer token file (default: `[admin_auth] token_file`
    /// of ./blockmirror.toml, if it has one).
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
    /// The CA that signed the node's certificate: talk HTTPS to the admin
    /// API (default: `[tls] ca` of ./blockmirror.toml when its admin port
    /// is HTTPS).
    #[arg(long, global = true)]
    ca: Option<PathBuf>,
    /// A client certificate (PEM) to present to the admin API over HTTPS,
    /// for a node with `[admin_auth] client_certs = true` (needs --key, and
    /// --ca or ./blockmirror.toml's; default: with client_certs and no
    /// token_file in ./blockmirror.toml, its `[tls] cert`).
    #[arg(long, global = true, requires = "key")]
    cert: Option<PathBuf>,
    /// The key of --cert (PEM).
    #[arg(long, global = true, requires = "cert")]
    key: Option<PathBuf>,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a node config and print what `serve` would run; exit 0 when valid.
    Check {
        /// The node config (TOML).
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Make a CA and a certificate per node under DIR: ca.pem (ca.key: keep
    /// it off the nodes), NAME.pem and NAME.key per node (subject names:
    /// NAME, 127.0.0.1, localhost), qemu-client/ for qemu and libnbd
    /// clients, qemu-server/ for qemu-nbd.
    Init {
        /// Where to write them (created; an existing ca.pem is not overwritten).
        dir: PathBuf,
        /// Node names, comma-separated (e.g. site-a,site-b).
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<String>,
        /// For tests of refusals: the qemu-client certificate is expired.
        #[arg(long, hide = true)]
        expired_client: bool,
    },
}

#[derive(Subcommand)]
enum Command {
    /// TLS certificates for nodes and hosts.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Run one node: every volume in the config, its NBD exports and admin HTTP.
    Serve {
        /// The node config (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Start a primary and a mirror (sync, or async with --mode async) on loopback.
    Demo {
        /// Where the demo's configs and images live.
        #[arg(long, default_value = "./blockmirror-demo")]
        dir: PathBuf,
        /// Volume size (e.g. 1GiB, 256MiB).
        #[arg(long, default_value = "1GiB")]
        size: String,
        /// Mirror mode: sync (default) or async.
        #[arg(long)]
        mode: Option<String>,
        /// Run a disaster drill instead: write, kill the primary, promote the
        /// mirror, check, bring the old primary back as a mirror, resync,
        /// check; prints each step's time and the RTO. Exit 0 when every
        /// check passed.
        #[arg(long)]
        drill: bool,
        /// Mutual TLS on the replication link and NBD STARTTLS (`tls =
        /// "allow"`), with certificates from `certs init` under DIR/tls.
        #[arg(long)]
        tls: bool,
        /// Cluster mode instead: a 3-member etcd and three sites (separate
        /// processes) on loopback, roles decided through etcd; stop the
        /// primary's process to see a mirror promoted.
        #[arg(long, conflicts_with_all = ["drill", "tls", "mode"])]
        cluster: bool,
    },
    /// Show what each volume is doing.
    Status {
        /// Admin address of the node (default: from ./blockmirror.toml, else 127.0.0.1:7780).
        #[arg(long)]
        admin: Option<SocketAddr>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Refresh in place every second until interrupted.
        #[arg(long, short)]
        watch: bool,
    },
    /// Print one line per state change (link up or down, state, role, resync,
    /// verify, split brain) as it happens, like `drbdsetup events2`.
    Events {
        /// Admin address of the node (default: from ./blockmirror.toml, else 127.0.0.1:7780).
        #[arg(long)]
        admin: Option<SocketAddr>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Print the current state first (`exists` lines), then the changes.
        #[arg(long)]
        now: bool,
    },
    /// Cluster mode (etcd): what the coordinator holds.
    Cluster {
        #[command(subcommand)]
        command: cluster_cli::ClusterCommand,
    },
    /// Node config tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Write the man pages (blockmirror.1 and one per subcommand) into DIR.
    Man {
        /// Where to write them.
        dir: PathBuf,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Compare a primary volume with its mirrors while it is in use.
    ///
    /// Exit status: 0 identical, 1 differ, 2 error.
    Verify {
        /// The volume (its name in the primary's config).
        volume: String,
        /// Admin address of the primary node (default: from ./blockmirror.toml, else 127.0.0.1:7780).
        #[arg(long)]
        admin: Option<SocketAddr>,
        /// Compare the data itself (remote reads) instead of checksums.
        #[arg(long)]
        full: bool,
        /// Mark the differing ranges out of sync so a resync repairs them.
        #[arg(long)]
        mark: bool,
        /// Parallel jobs per mirror (1-16; default 8, 4 with --full).
        #[arg(long)]
        jobs: Option<usize>,
    },
    /// Switch a primary volume's mirrors between sync and async while running.
    SetMode {
        /// The volume (its name in the primary's config).
        volume: String,
        /// sync or async.
        mode: String,
        /// Only this mirror (its `peer` as configured); default every mirror.
        #[arg(long)]
        peer: Option<String>,
        /// Admin address of the primary node (default: from ./blockmirror.toml, else 127.0.0.1:7780).
        #[arg(long)]
        admin: Option<SocketAddr>,
    },
    /// Make a mirror volume the primary (read-write export, new generation).
    Promote {
        /// The volume (or --group).
        #[arg(required_unless_present = "group")]
        volume: Option<String>,
        /// Promote every volume of this consistency group on the node, at
        /// one point: every link of the old primary is cut before any
        /// volume is promoted.
        #[arg(long, conflicts_with = "volume")]
        group: Option<String>,
        /// Admin address of the mirror's node.
        #[arg(long)]
        admin: Option<SocketAddr>,
        /// Promote even while the primary is connected, or the mirror is inconsistent.
        #[arg(long)]
        force: bool,
    },
    /// Make a primary volume a mirror (read-only export; it waits for a new
    /// primary, which resyncs it with only what differs).
    Demote {
        volume: String,
        /// Admin address of the primary's node.
        #[arg(long)]
        admin: Option<SocketAddr>,
    },
    /// Start or resume a resync and follow it until the mirror is in sync.
    Resync {
        volume: String,
        /// Admin address of the node.
        #[arg(long)]
        admin: Option<SocketAddr>,
        /// Resolve a split brain by throwing this side's changes away: it
        /// becomes (or stays) the mirror and takes a full copy from its primary.
        #[arg(long)]
        discard_local: bool,
        /// Return at once instead of following the resync.
        #[arg(long)]
        no_wait: bool,
        /// On a primary: pace resync copies to this many bytes per second
        /// (e.g. 100MiB; 0: unlimited), at once, also a running copy.
        #[arg(long)]
        rate: Option<String>,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("blockmirror")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("blockmirror: cannot start the runtime: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(Outcome::Success) => std::process::ExitCode::SUCCESS,
        Ok(Outcome::Differ) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("blockmirror: {}", report(&e));
            std::process::ExitCode::from(2)
        }
    }
}

/// The error and its causes on one line, each cause once: several error
/// types already include their cause in their own message.
fn report(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

/// How a command that did not fail ended.
enum Outcome {
    Success,
    /// `verify` found differences (exit 1).
    Differ,
}

/// The admin client's token, CA and client certificate: the flags, else
/// ./blockmirror.toml.
fn configure_admin_client(
    token_file: Option<PathBuf>,
    ca: Option<PathBuf>,
    identity: Option<(PathBuf, PathBuf)>,
) -> Result<()> {
    let local = std::env::current_dir()
        .ok()
        .map(|d| d.join(config::DEFAULT_CONFIG_FILE))
        .filter(|p| p.is_file())
        .and_then(|p| NodeConfig::load(&p).ok());
    let token_file = token_file.or_else(|| {
        local
            .as_ref()
            .and_then(|c| c.admin_auth.as_ref().and_then(|a| a.token_file.clone()))
    });
    // A node that takes client certificates only: run in its directory,
    // the CLI presents the node's own certificate (it chains to the CA).
    let identity = identity.or_else(|| {
        let c = local.as_ref()?;
        let a = c.admin_auth.as_ref()?;
        let t = c.tls.as_ref()?;
        (a.client_certs && a.token_file.is_none() && token_file.is_none())
            .then(|| (t.cert.clone(), t.key.clone()))
    });
    let ca = ca.or_else(|| {
        local.as_ref().and_then(|c| {
            c.tls
                .as_ref()
                .filter(|t| t.admin_https)
                .map(|t| t.ca.clone())
        })
    });
    let token = token_file
        .map(|p| blockmirror_node::daemon::admin_auth::read_token(&p))
        .transpose()?;
    if identity.is_some() && ca.is_none() {
        anyhow::bail!(
            "--cert: a client certificate goes over HTTPS: give --ca (the CA that signed \
             the node's certificate) too"
        );
    }
    let tls = ca
        .map(|p| {
            let id = identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
            blockmirror_node::tls::client_config(&p, id)
        })
        .transpose()?;
    admin::configure_client(admin::ClientSettings { token, tls });
    Ok(())
}

async fn run(cli: Cli) -> Result<Outcome> {
    let ok = |r: Result<()>| r.map(|()| Outcome::Success);
    if !matches!(
        cli.command,
        Command::Serve { .. }
            | Command::Certs { .. }
            | Command::Man { .. }
            | Command::Completions { .. }
            | Command::Config { .. }
            | Command::Cluster { .. }
    ) {
        configure_admin_client(cli.token_file, cli.ca, cli.cert.zip(cli.key))?;
    }
    match cli.command {
        Command::Serve { config } => ok(serve(&config).await),
        Command::Demo {
            dir,
            size,
            cluster: true,
            ..
        } => ok(cluster_demo::run(&dir, &size).await),
        Command::Demo {
            dir,
            size,
            drill: true,
            ..
        } => {
            let bytes = config::parse_size(&size).map_err(|e| anyhow::anyhow!("--size: {e}"))?;
            if drill::run(&dir, &size, bytes).await? {
                Ok(Outcome::Success)
            } else {
                Ok(Outcome::Differ)
            }
        }
        Command::Demo {
            dir,
            size,
            mode,
            tls,
            ..
        } => ok(demo(&dir, &size, mode.as_deref(), tls).await),
        Command::Status { admin, json, watch } => ok(show_status(admin, json, watch).await),
        Command::Events { admin, json, now } => ok(events(admin, json, now).await),
        Command::Config {
            command: ConfigCommand::Check { file },
        } => ok(config_check(&file)),
        Command::Cluster { command } => ok(cluster_cli::run(command).await),
        Command::Man { dir } => ok(man(&dir)),
        Command::Certs {
            command:
                CertsCommand::Init {
                    dir,
                    nodes,
                    expired_client,
                },
        } => {
            use blockmirror_node::tls::certs;
            let w = certs::init(&dir, &nodes, &certs::InitOptions { expired_client })?;
            println!("CA:          {}", w.ca.display());
            for (n, c, k) in &w.nodes {
                println!("node {n}: {} {}", c.display(), k.display());
            }
            println!("qemu/libnbd: {}/", w.qemu_client.display());
            println!("qemu-nbd:    {}/", w.qemu_server.display());
            Ok(Outcome::Success)
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "blockmirror",
                &mut std::io::stdout(),
            );
            Ok(Outcome::Success)
        }
        Command::Verify {
            volume,
            admin,
            full,
            mark,
            jobs,
        } => verify(&volume, admin, full, mark, jobs).await,
        Command::SetMode {
            volume,
            mode,
            peer,
            admin,
        } => {
            let addr = match admin {
                Some(a) => a,
                None => config::default_admin_addr(&std::env::current_dir()?),
            };
            let peers = admin::set_mode(
                addr,
                &volume,
                &admin::ModeRequest {
                    mode: mode.clone(),
                    peer,
                },
            )
            .await?;
            for p in peers {
                println!("{volume} -> {p}: {mode}");
            }
            Ok(Outcome::Success)
        }
        Command::Promote {
            volume,
            group,
            admin,
            force,
        } => {
            let addr = admin_addr(admin)?;
            let path = match (volume, group) {
                (_, Some(g)) => format!("/groups/{g}/promote"),
                (Some(v), None) => format!("/volumes/{v}/promote"),
                (None, None) => bail!("name a volume, or --group"),
            };
            let msg = admin::post_control(addr, &path, &admin::PromoteRequest { force }).await?;
            println!("{msg}");
            Ok(Outcome::Success)
        }
        Command::Demote { volume, admin } => {
            let addr = admin_addr(admin)?;
            let path = format!("/volumes/{volume}/demote");
            let msg = admin::post_control(addr, &path, &admin::DemoteRequest {}).await?;
            println!("{msg}");
            Ok(Outcome::Success)
        }
        Command::Resync {
            volume,
            admin,
            discard_local,
            no_wait,
            rate,
        } => {
            let rate = rate
                .map(|r| config::parse_size(&r).map_err(|e| anyhow::anyhow!("--rate: {e}")))
                .transpose()?;
            let req = admin::ResyncRequest {
                discard_local,
                rate,
            };
            ok(resync(admin_addr(admin)?, &volume, req, no_wait).await)
        }
    }
}

/// Starts a verify, shows its progress by polling /status, prints the
/// differing ranges.
async fn verify(
    volume: &str,
    addr: Option<SocketAddr>,
    full: bool,
    mark: bool,
    jobs: Option<usize>,
) -> Result<Outcome> {
    use indicatif::{ProgressBar, ProgressStyle};
    let addr = match addr {
        Some(a) => a,
        None => config::default_admin_addr(&std::env::current_dir()?),
    };
    let req = admin::VerifyRequest { full, mark, jobs };
    let id = admin::start_verify(addr, volume, &req).await?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} verify {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_message(volume.to_owned());
    let runs = loop {
        let st = admin::fetch_status(addr).await?;
        let v = st
            .volumes
            .iter()
            .find(|v| v.name == volume)
            .with_context(|| format!("volume {volume} vanished from /status"))?;
        let runs: Vec<(String, blockmirror_node::primary::verify::VerifyStatus)> = v
            .mirrors
            .iter()
            .filter_map(|m| {
                m.last_verify
                    .clone()
                    .filter(|r| r.id == id)
                    .map(|r| (m.peer.clone(), r))
            })
            .collect();
        bar.set_length(runs.iter().map(|(_, r)| r.total_bytes).sum());
        bar.set_position(runs.iter().map(|(_, r)| r.done_bytes).sum());
        if !runs.is_empty() && runs.iter().all(|(_, r)| !r.is_running()) {
            break runs;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    bar.finish_and_clear();
    let mut outcome = Outcome::Success;
    let mut failed = Vec::new();
    for (peer, r) in &runs {
        let mode = if r.full { "data" } else { "checksums" };
        match r.state.as_str() {
            "identical" => println!(
                "{volume} vs {peer}: identical ({mode}; {} checked, {} skipped as out of sync)",
                status::human_bytes(r.total_bytes - r.skipped_bytes),
                status::human_bytes(r.skipped_bytes)
            ),
            "differ" => {
                outcome = Outcome::Differ;
                println!(
                    "{volume} vs {peer}: {} differ in {} ranges ({mode}; {} skipped as out of sync){}",
                    status::human_bytes(r.differing_bytes),
                    r.differing.len(),
                    status::human_bytes(r.skipped_bytes),
                    if r.mark { "; marked for resync" } else { "" }
                );
                for d in &r.differing {
                    println!("  offset {} length {}", d.offset, d.len);
                }
            }
            _ => failed.push(format!(
                "{peer}: {}",
                r.error.as_deref().unwrap_or("verify failed")
            )),
        }
    }
    if !failed.is_empty() {
        bail!("verify of {volume} failed: {}", failed.join("; "));
    }
    Ok(outcome)
}

/// Cancels `token` on SIGINT or SIGTERM.
fn cancel_on_signals(token: CancellationToken) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: shutting down"),
            _ = int.recv() => info!("SIGINT: shutting down"),
        }
        token.cancel();
    });
    Ok(())
}

async fn serve(path: &Path) -> Result<()> {
    let config = NodeConfig::load(path)?;
    let shutdown = CancellationToken::new();
    cancel_on_signals(shutdown.clone())?;
    let node = Node::open(config)?;
    let running = node.start(shutdown.clone()).await?;
    systemd_ready(&shutdown);
    let r = running.wait().await;
    // Best effort, like every sd_notify call: no-op without NOTIFY_SOCKET.
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    r.map_err(Into::into)
}

/// Under systemd (`Type=notify`): READY=1 once every listener is bound, and
/// WATCHDOG=1 at half of `WatchdogSec` from a task on the runtime (a runtime
/// that stops scheduling tasks stops the pings, and systemd restarts the
/// node). Without NOTIFY_SOCKET, nothing.
fn systemd_ready(shutdown: &CancellationToken) {
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "sd_notify READY=1 failed");
    }
    let mut usec = 0u64;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        let every = std::time::Duration::from_micros(usec / 2);
        info!(every = ?every, "systemd watchdog enabled");
        let sd = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = sd.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
            }
        });
    }
}

/// A free loopback port: `preferred` if it can be bound, else one the kernel picks.
fn free_port(preferred: u16) -> Result<u16> {
    if TcpListener::bind(("127.0.0.1", preferred)).is_ok() {
        return Ok(preferred);
    }
    Ok(TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

/// Creates a demo's folder and, the first time, its shared secret
/// (`secret.key`, 32 random bytes in hex); returns the folder, absolute.
fn demo_dir(dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let secret = dir.join("secret.key");
    if !secret.exists() {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|e| anyhow::anyhow!("random secret: {e}"))?;
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(&secret, hex + "\n")
            .with_context(|| format!("writing {}", secret.display()))?;
    }
    Ok(dir)
}

async fn demo(dir: &Path, size: &str, mode: Option<&str>, tls: bool) -> Result<()> {
    let mode = match mode {
        None | Some("sync") => "sync",
        Some("async") => "async",
        Some(other) => bail!("--mode {other}: expected sync or async"),
    };
    let size_bytes = config::parse_size(size).map_err(|e| anyhow::anyhow!("--size: {e}"))?;
    let dir = demo_dir(dir)?;
    let certs = dir.join("tls");
    if tls && !certs.join("ca.pem").exists() {
        let nodes = ["demo-primary".to_string(), "demo-mirror".to_string()];
        blockmirror_node::tls::certs::init(&certs, &nodes, &Default::default())?;
    }
    // The admin ports stay plain HTTP: the demo prints http:// addresses.
    let tls_table = |node: &str| {
        if tls {
            format!(
                "\n[tls]\nca = \"tls/ca.pem\"\ncert = \"tls/{node}.pem\"\nkey = \"tls/{node}.key\"\nadmin_https = false\n"
            )
        } else {
            String::new()
        }
    };
    let (m_tls, p_tls) = (tls_table("demo-mirror"), tls_table("demo-primary"));
    let (peer_a, peer_b) = if tls {
        (
            "peer_name = \"demo-primary\"\n",
            "peer_name = \"demo-mirror\"\n",
        )
    } else {
        ("", "")
    };
    let (p_nbd, p_admin, p_listen) = (free_port(10809)?, free_port(7780)?, free_port(7700)?);
    let (m_nbd, m_admin, m_listen) = (free_port(10810)?, free_port(7781)?, free_port(7701)?);
    let mirror_text = format!(
        r#"# blockmirror demo: the mirror node (site B). Its mirror table names
# site A, used once B is promoted (failover), so that A can fail back.
node = "demo-mirror"
listen = "127.0.0.1:{m_listen}"
admin = "127.0.0.1:{m_admin}"
secret_file = "secret.key"
{m_tls}
[[volume]]
name = "demo"
path = "mirror/demo.img"
size = "{size}"
role = "mirror"
nbd = "127.0.0.1:{m_nbd}"

[[volume.mirror]]
peer = "127.0.0.1:{p_listen}"
mode = "{mode}"
{peer_a}"#
    );
    let primary_text = format!(
        r#"# blockmirror demo: the primary node (site A), mirrored ({mode}) to site B.
# Its listener lets it become B's mirror after a demote (or a failover).
node = "demo-primary"
listen = "127.0.0.1:{p_listen}"
admin = "127.0.0.1:{p_admin}"
secret_file = "secret.key"
{p_tls}
[[volume]]
name = "demo"
path = "primary/demo.img"
size = "{size}"
role = "primary"
nbd = "127.0.0.1:{p_nbd}"

[[volume.mirror]]
peer = "127.0.0.1:{m_listen}"
mode = "{mode}"
{peer_b}"#
    );
    let m_cfg = dir.join("mirror.toml");
    let p_cfg = dir.join("primary.toml");
    std::fs::write(&m_cfg, mirror_text).with_context(|| format!("writing {}", m_cfg.display()))?;
    std::fs::write(&p_cfg, primary_text).with_context(|| format!("writing {}", p_cfg.display()))?;
    // Ctrl-C stops whichever site is primary at that moment first, then the
    // other, as an operator would: the primary's links close cleanly instead
    // of seeing their mirror vanish.
    let signal = CancellationToken::new();
    let stop_primary = CancellationToken::new();
    let stop_mirror = CancellationToken::new();
    cancel_on_signals(signal.clone())?;
    let mirror = Node::open(NodeConfig::load(&m_cfg)?)?
        .start(stop_mirror.clone())
        .await?;
    let primary = Node::open(NodeConfig::load(&p_cfg)?)?
        .start(stop_primary.clone())
        .await?;
    let (site_a, site_b) = (primary.endpoints.admin, mirror.endpoints.admin);
    let (mut uri, mut muri) = (
        primary.endpoints.exports[0].1.clone(),
        mirror.endpoints.exports[0].1.clone(),
    );
    let (mut pa, mut ma) = (primary.endpoints.admin, mirror.endpoints.admin);
    // Roles survive restarts: after a switchover in an earlier run, site B
    // is the primary now.
    let role = |st: Option<status::NodeStatus>| {
        st.and_then(|s| s.volumes.first().map(|v| v.role.clone()))
            .unwrap_or_default()
    };
    if role(admin::fetch_status(pa).await.ok()) == "mirror"
        && role(admin::fetch_status(ma).await.ok()) == "primary"
    {
        std::mem::swap(&mut uri, &mut muri);
        std::mem::swap(&mut pa, &mut ma);
        println!("(site B is the primary since a switchover in an earlier run)");
    }
    println!(
        "blockmirror demo is running: a primary and {} {mode} mirror on loopback ({}).",
        if mode == "async" { "an" } else { "a" },
        dir.display()
    );
    println!();
    println!("  primary  (read-write)  {uri}   {size_bytes} bytes   admin http://{pa}/status");
    println!("  mirror   (read-only)   {muri}   admin http://{ma}/status");
    println!();
    println!("Try:");
    println!("  nbdinfo {uri}");
    if tls {
        let creds = certs.join("qemu-client");
        let tls_uri = uri.replacen("nbd://", "nbds://", 1);
        println!(
            "  nbdinfo '{tls_uri}?tls-certificates={}'      # over TLS (the link is mutual TLS too)",
            creds.display()
        );
    }
    println!("  qemu-io -f raw -c 'write -P 0xab 0 1M' -c flush {uri}");
    println!("  qemu-io -f raw -r -c 'read -P 0xab 0 1M' {muri}      # the mirror has it");
    println!("  fio --name=w --ioengine=nbd --uri={uri} --rw=randwrite --bs=4k --iodepth=32 --size=256M --runtime=10 --time_based");
    println!("  blockmirror status --admin {pa}");
    println!("  blockmirror verify demo --admin {pa}              # compare primary and mirror");
    println!("  blockmirror demote demo --admin {pa} && blockmirror promote demo --admin {ma}   # switch over");
    println!("  blockmirror demo --drill                          # a disaster drill (separate processes)");
    println!();
    println!("Press Ctrl-C to stop.");
    signal.cancelled().await;
    let b_first = role(admin::fetch_status(site_b).await.ok()) == "primary"
        && role(admin::fetch_status(site_a).await.ok()) != "primary";
    let (a_result, b_result) = if b_first {
        stop_mirror.cancel();
        let b = mirror.wait().await;
        stop_primary.cancel();
        (primary.wait().await, b)
    } else {
        stop_primary.cancel();
        let a = primary.wait().await;
        stop_mirror.cancel();
        (a, mirror.wait().await)
    };
    a_result?;
    b_result?;
    Ok(())
}

fn admin_addr(addr: Option<SocketAddr>) -> Result<SocketAddr> {
    Ok(match addr {
        Some(a) => a,
        None => config::default_admin_addr(&std::env::current_dir()?),
    })
}

/// Where a volume's resync stands, as one node's /status shows it.
struct Progress {
    done: u64,
    total: u64,
    in_sync: bool,
    /// A state that no waiting will change (split brain, suspended).
    stuck: Option<String>,
    label: String,
}

fn progress(st: &status::NodeStatus, volume: &str) -> Result<Progress> {
    let v = st
        .volumes
        .iter()
        .find(|v| v.name == volume)
        .with_context(|| format!("node {} has no volume {volume:?}", st.node))?;
    if !v.mirrors.is_empty() {
        let (mut done, mut total) = (0, 0);
        let mut stuck = None;
        for m in &v.mirrors {
            done += m.resync_done_bytes;
            total += m.resync_total_bytes;
            if m.state == "split_brain" || m.state == "suspended" {
                stuck = Some(format!(
                    "mirror {}: {}: {}",
                    m.peer,
                    m.state,
                    m.last_error.clone().unwrap_or_default()
                ));
            }
        }
        let in_sync = v.mirrors.iter().all(|m| m.state == "in_sync");
        let states: Vec<&str> = v.mirrors.iter().map(|m| m.state.as_str()).collect();
        return Ok(Progress {
            done,
            total,
            in_sync,
            stuck,
            label: states.join(","),
        });
    }
    let state = v.state.clone().unwrap_or_else(|| v.role.clone());
    Ok(Progress {
        // A mirror knows only what it applied; a full copy is the volume.
        done: v.applied_bytes.unwrap_or(0).min(v.size_bytes),
        total: v.size_bytes,
        in_sync: state == "in_sync",
        stuck: (v.role == "primary" && v.mirrors.is_empty())
            .then(|| format!("{volume} is a primary without mirrors here")),
        label: state,
    })
}

async fn resync(
    addr: SocketAddr,
    volume: &str,
    req: admin::ResyncRequest,
    no_wait: bool,
) -> Result<()> {
    let path = format!("/volumes/{volume}/resync");
    let msg = admin::post_control(addr, &path, &req).await?;
    println!("{msg}");
    if no_wait {
        return Ok(());
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {msg:12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    loop {
        let p = progress(&admin::fetch_status(addr).await?, volume)?;
        bar.set_length(p.total.max(1));
        bar.set_position(p.done.min(p.total));
        bar.set_message(p.label.clone());
        if p.in_sync {
            bar.finish_with_message("in_sync");
            return Ok(());
        }
        if let Some(why) = p.stuck {
            bar.abandon();
            bail!("{why}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

async fn show_status(addr: Option<SocketAddr>, json: bool, watch: bool) -> Result<()> {
    let addr = admin_addr(addr)?;
    loop {
        let st = admin::fetch_status(addr).await;
        let text = match (&st, json) {
            (Ok(st), true) => format!("{}\n", serde_json::to_string_pretty(st)?),
            (Ok(st), false) => status::render_table(st),
            (Err(e), _) if watch => format!("{addr}: {e}\n"),
            (Err(_), _) => return Err(st.unwrap_err().into()),
        };
        if !watch {
            print!("{text}");
            return Ok(());
        }
        // Home, the new text, clear to the end of the screen: no flicker.
        let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
        print!("\x1b[H\x1b[2J{stamp}  {addr}\n{text}");
        use std::io::Write as _;
        std::io::stdout().flush()?;
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// `blockmirror events`: follows GET /events until the node goes away.
async fn events(addr: Option<SocketAddr>, json: bool, now: bool) -> Result<()> {
    use std::io::Write as _;
    let addr = admin_addr(addr)?;
    let mut out = std::io::stdout();
    let follow = admin::follow_events(addr, now, |e| {
        let line = if json {
            serde_json::to_string(&e).unwrap_or_default()
        } else {
            e.to_line()
        };
        // A closed stdout (`| head`) ends the command.
        writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
    });
    tokio::select! {
        r = follow => r?,
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}

/// `blockmirror config check FILE`.
fn config_check(file: &Path) -> Result<()> {
    let cfg = NodeConfig::load(file).with_context(|| format!("{}", file.display()))?;
    println!("{}: valid", file.display());
    println!("node {}", cfg.node);
    match cfg.listen {
        Some(l) => println!("  replication listener {l}"),
        None => println!("  no replication listener (cannot be a mirror)"),
    }
    if cfg.listen.is_some() || cfg.volumes.iter().any(|v| !v.mirrors.is_empty()) {
        match cfg.link_auth() {
            Some(m) => println!("  replication links authenticated with {m}"),
            None => {
                println!("  replication links cannot be authenticated (no secret_file, no [tls])")
            }
        }
    }
    println!(
        "  admin HTTP {} (status page at http://{}/)",
        cfg.admin, cfg.admin
    );
    for v in &cfg.volumes {
        println!(
            "  volume {}: {} {} at {}, NBD {}",
            v.name,
            v.role.as_str(),
            status::human_bytes(v.size),
            v.path.display(),
            v.nbd.uri(&v.name)
        );
        for m in &v.mirrors {
            println!("    mirror {} {}", m.peer, m.mode.as_str());
        }
    }
    Ok(())
}

/// `blockmirror man DIR`: one page for the binary, one per subcommand.
fn man(dir: &Path) -> Result<()> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cmd = Cli::command();
    let mut pages = vec![("blockmirror".to_string(), cmd.clone())];
    for sub in cmd.get_subcommands() {
        if sub.get_name() == "help" {
            continue;
        }
        let name = format!("blockmirror-{}", sub.get_name());
        let leaked: &'static str = Box::leak(name.clone().into_boxed_str());
        pages.push((name, sub.clone().name(leaked)));
    }
    for (name, c) in pages {
        let path = dir.join(format!("{name}.1"));
        let mut buf = Vec::new();
        clap_mangen::Man::new(c).render(&mut buf)?;
        std::fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))?;
        println!("{}", path.display());
    }
    Ok(())
}
