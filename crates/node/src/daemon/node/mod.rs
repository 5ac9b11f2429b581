//! One node: opens every volume of a config, serves their NBD exports and the
//! admin HTTP server, and shuts all of it down cleanly.
//!
//! Start-up: open each backend, load (or create) its metadata record and mark
//! it "not clean" durably before any client can write, bind every listener.
//! Shutdown: stop accepting, let every connection finish and answer its
//! in-flight requests, fdatasync every backend, then mark the records clean.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use blockmirror_nbd::{Export, Exports, ListenAddr, Listener};
use blockmirror_storage::{Backend, FileBackend, FileOptions, StorageError};
use thiserror::Error;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use std::collections::HashMap;

use blockmirror_core::activity::{ActivityLog, DEFAULT_CAPACITY, DEFAULT_EXTENT_SIZE};
use blockmirror_core::role::{self as roles, Action, Event, RoleError};

use crate::daemon::admin::{
    self, AdminSource, ControlError, DemoteRequest, PromoteRequest, ResyncRequest, VerifyRequest,
};
use crate::daemon::admin_auth::{read_token, AdminAuth, AdminListener};
use crate::daemon::config::{NbdListen, NodeConfig, Role, VolumeConfig};
use crate::daemon::metrics::{self};
use crate::daemon::role_driver::{DriveError, RoleDriver};
use crate::daemon::status::{MirrorStatus, NodeStatus, VolumeStatus};
use crate::mirror::apply::ApplyConfig;
use crate::mirror::jobs::{DeviceConstants, JobService, MAX_JOBS};
use crate::mirror::receiver::{self, MirrorTarget};
use crate::primary::group::SiteGroup;
use crate::primary::link::{LinkContext, LinkTuning};
use crate::primary::oos_store::{OosStore, OosStoreError, RecoveryOutcome};
use crate::primary::reads::ReadRouter;
use crate::primary::verify::{VerifyService, VerifyVolume};
use crate::primary::{GenState, MirrorLink, Replicator};
use crate::tls::TlsStore;
use crate::volume::local_disk::{FaultRequest, LocalDisk, LocalDiskError};
use crate::volume::meta_file::{self, MetaCell, MetaFileError};
use crate::volume::role::RoleCell;
use crate::volume::Volume;

mod live;
mod role_changes;
mod source;

use live::bind_nbd;
use role_changes::{demote_volume, finish_demote, promote_together, promote_volume};
use source::metrics_registry;

#[derive(Debug, Error)]
pub enum NodeError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Meta(#[from] MetaFileError),
    #[error(transparent)]
    MirrorState(#[from] OosStoreError),
    #[error(transparent)]
    LocalDisk(#[from] LocalDiskError),
    #[error("cannot listen on {addr} for {what}: {source}")]
    Bind {
        what: String,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Token(#[from] crate::daemon::admin_auth::TokenError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

struct OpenVolume {
    volume: Arc<Volume>,
    /// `consistency_group`.
    group: Option<String>,
    /// The volume's fencing state, shared by its write path, links and
    /// receiver (inert without `[cluster]`).
    fence: Arc<crate::cluster::fence::Fence>,
    nbd: NbdListen,
    meta: Arc<MetaCell>,
    /// On a mirror volume: what the replication receiver applies to.
    target: Option<Arc<MirrorTarget>>,
}

/// What opening a volume needs of its node: at start, or when etcd assigns
/// one to it at run time (cluster mode).
struct NodeCtx {
    /// Cluster mode: the node's lease clock.
    lease: Option<Arc<crate::cluster::fence::LeaseClock>>,
    config: NodeConfig,
    state_dir: PathBuf,
    /// `secret_file`, read. With `[tls]` it may be absent (TLS alone
    /// authenticates links); both present, links need both.
    secret: Option<Arc<[u8]>>,
    /// `[tls]`, loaded.
    tls: Option<Arc<TlsStore>>,
}

/// A node whose volumes are open but not yet served.
pub struct Node {
    cx: Arc<NodeCtx>,
    volumes: Vec<OpenVolume>,
    groups: HashMap<(String, SocketAddr), Arc<SiteGroup>>,
    /// `[admin_auth]`, its token read.
    admin_auth: Option<Arc<AdminAuth>>,
}

/// Reads the shared secret: the file's bytes, without trailing whitespace.
fn read_secret(path: &std::path::Path) -> Result<Arc<[u8]>, NodeError> {
    let raw = std::fs::read(path).map_err(|source| NodeError::Io {
        what: format!("reading secret_file {}", path.display()),
        source,
    })?;
    let end = raw
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(0, |i| i + 1);
    if end < 16 {
        return Err(NodeError::Io {
            what: format!("secret_file {}", path.display()),
            source: std::io::Error::other(
                "the secret must be at least 16 bytes (32 random bytes recommended)",
            ),
        });
    }
    Ok(Arc::from(&raw[..end]))
}

/// Where a running node's volumes and admin server can be reached.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub admin: SocketAddr,
    /// (volume name, NBD URI), in config order.
    pub exports: Vec<(String, String)>,
}

/// A node that is serving; [`Running::wait`] returns after shutdown.
pub struct Running {
    pub endpoints: Endpoints,
    tasks: JoinSet<std::io::Result<()>>,
    live: Arc<Live>,
}

impl Node {
    /// Opens every volume's backend and metadata.
    pub fn open(config: NodeConfig) -> Result<Node, NodeError> {
        let state_dir = state_dir(&config);
        let secret = config.secret_file.as_deref().map(read_secret).transpose()?;
        let tls = match &config.tls {
            None => None,
            Some(t) => Some(Arc::new(TlsStore::load(t.clone())?)),
        };
        let admin_auth = match &config.admin_auth {
            None => None,
            Some(a) => Some(Arc::new(AdminAuth::new(
                a.token_file.as_deref().map(read_token).transpose()?,
                a.open_reads,
                a.client_certs,
            ))),
        };
        let lease = config
            .cluster
            .as_ref()
            .map(|_| Arc::new(crate::cluster::fence::LeaseClock::new()));
        let cx = Arc::new(NodeCtx {
            lease,
            config,
            state_dir,
            secret,
            tls,
        });
        let mut volumes = Vec::new();
        for vc in &cx.config.volumes {
            volumes.push(open_volume(&cx, vc)?);
        }
        let mut groups = HashMap::new();
        join_groups(&mut groups, cx.config.volumes.iter().zip(&volumes));
        for g in groups.values() {
            info!(group = %g.name, site = %g.site, volumes = g.size(), "consistency group");
        }
        Ok(Node {
            cx,
            volumes,
            groups,
            admin_auth,
        })
    }

    /// Binds every listener and starts serving; `shutdown` stops it all.
    pub async fn start(self, shutdown: CancellationToken) -> Result<Running, NodeError> {
        let cx = self.cx.clone();
        let config = &cx.config;
        let mut tasks = JoinSet::new();
        let mut batch = Vec::new();
        for v in self.volumes {
            let (listener, uri) = bind_nbd(&v).await?;
            batch.push((v, listener, uri));
        }
        let exports: Vec<(String, String)> = batch
            .iter()
            .map(|(v, _, uri)| (v.volume.name().to_owned(), uri.clone()))
            .collect();
        let admin_listener =
            tokio::net::TcpListener::bind(config.admin)
                .await
                .map_err(|source| NodeError::Bind {
                    what: "admin HTTP".into(),
                    addr: config.admin.to_string(),
                    source,
                })?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|source| NodeError::Io {
                what: "admin listener address".into(),
                source,
            })?;

        // The replication listener: every volume of a node with `listen`
        // can be fed by a primary (a mirror now, a primary after a demote),
        // and so can volumes etcd assigns here later.
        let targets: Arc<receiver::Targets> = Arc::default();
        let mut job_service = None;
        if let Some(addr) = config.listen {
            match (cx.secret.clone(), &cx.tls) {
                (None, None) => warn!(%addr,
                    "`listen` without `secret_file` or [tls]: no replication link can be \
                     authenticated, so none is accepted"),
                (secret, _) => {
                    let l = tokio::net::TcpListener::bind(addr)
                        .await
                        .map_err(|source| NodeError::Bind {
                            what: "replication".into(),
                            addr: addr.to_string(),
                            source,
                        })?;
                    info!(%addr, auth = config.link_auth().map_or("none", |m| m.as_str()),
                        "accepting replication links");
                    let jobs = Arc::new(
                        JobService::new(
                            JobService::mirror_id_for(&config.node),
                            MAX_JOBS,
                            config.job_timeout,
                            std::iter::empty(),
                        )
                        .with_idle_timeout(config.job_idle_timeout),
                    );
                    job_service = Some(jobs.clone());
                    tasks.spawn(receiver::serve(
                        l,
                        config.node.clone(),
                        secret,
                        cx.tls.clone(),
                        targets.clone(),
                        jobs,
                        shutdown.clone(),
                    ));
                }
            }
        }
        let live = Arc::new(Live {
            cx: cx.clone(),
            served: Arc::default(),
            targets,
            jobs: job_service.clone(),
            verify: Arc::new(VerifyService::new(Vec::new(), shutdown.clone())),
            links: TaskTracker::new(),
            link_stop: CancellationToken::new(),
            servers: TaskTracker::new(),
            server_error: std::sync::Mutex::new(None),
            shutdown: shutdown.clone(),
            cluster: std::sync::OnceLock::new(),
            groups: std::sync::Mutex::new(self.groups),
            declared: tokio::sync::Mutex::new(Vec::new()),
        });
        // Cluster mode: the agent that takes and watches the volumes' keys
        // in etcd, performs the role changes they call for, and opens the
        // volumes declared there for this node.
        let cluster = config.cluster.clone().map(|cfg| {
            let agent = crate::cluster::Agent::new(
                cfg,
                cx.lease.clone().expect("made at open with [cluster]"),
                &config.node,
                admin_addr,
                config.listen,
                Vec::new(),
                Arc::new(ClusterRoles {
                    volumes: live.served.clone(),
                }),
            );
            agent.set_host(Arc::downgrade(&live) as std::sync::Weak<dyn crate::cluster::Host>);
            let _ = live.cluster.set(agent.clone());
            agent
        });
        live.serve(batch);
        if let Some(agent) = &cluster {
            let (a, sd) = (agent.clone(), shutdown.clone());
            tasks.spawn(async move {
                a.run(sd).await;
                Ok(())
            });
        }
        let observer = crate::daemon::events::Observer::new(&config.node, shutdown.clone());
        let metrics = metrics_registry(
            &live.served,
            &live.verify,
            job_service.as_ref(),
            cluster.as_ref(),
        );
        let source = Arc::new(StatusSource {
            observer: observer.clone(),
            verify: live.verify.clone(),
            node: config.node.clone(),
            tls: cx.tls.clone(),
            volumes: live.served.clone(),
            metrics,
            cluster,
        });
        {
            let (src, sd) = (source.clone() as Arc<dyn AdminSource>, shutdown.clone());
            tasks.spawn(async move {
                observer.run(src, sd).await;
                Ok(())
            });
        }
        // SIGHUP: read the TLS files again (new connections use them).
        {
            let (tls, sd) = (cx.tls.clone(), shutdown.clone());
            let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                .map_err(|source| NodeError::Io {
                    what: "installing the SIGHUP handler".into(),
                    source,
                })?;
            tasks.spawn(async move {
                loop {
                    tokio::select! {
                        _ = sd.cancelled() => return Ok(()),
                        _ = hup.recv() => {}
                    }
                    match &tls {
                        None => info!("SIGHUP: no [tls] to reload"),
                        Some(t) => {
                            if let Err(e) = t.reload() {
                                warn!(error = %e, "SIGHUP: TLS reload failed; keeping the old certificates");
                            }
                        }
                    }
                }
            });
        }
        let admin_io = |source| NodeError::Io {
            what: "admin listener".into(),
            source,
        };
        let (admin_listener, https) = match &cx.tls {
            Some(t) if t.settings().admin_https => {
                let client_certs = self.admin_auth.as_ref().is_some_and(|a| a.client_certs());
                (
                    AdminListener::tls(admin_listener, t.clone(), client_certs)
                        .map_err(admin_io)?,
                    true,
                )
            }
            _ => (
                AdminListener::plain(admin_listener).map_err(admin_io)?,
                false,
            ),
        };
        info!(%admin_addr, https,
            token = self.admin_auth.as_ref().is_some_and(|a| a.has_token()),
            client_certs = self.admin_auth.as_ref().is_some_and(|a| a.client_certs()),
            "admin API");
        let sd = shutdown.clone();
        tasks.spawn(admin::serve_with(
            admin_listener,
            source,
            self.admin_auth.clone(),
            async move { sd.cancelled().await },
        ));

        for (name, uri) in &exports {
            info!(volume = %name, %uri, "serving NBD export");
        }
        info!(admin = %admin_addr, node = %config.node, "node running");
        Ok(Running {
            endpoints: Endpoints {
                admin: admin_addr,
                exports,
            },
            tasks,
            live,
        })
    }
}

/// A serving node's parts that grow when a volume is added at run time
/// (cluster mode: etcd assigns it here).
struct Live {
    cx: Arc<NodeCtx>,
    served: Arc<ServedSet>,
    /// What the replication receiver applies to, by volume.
    targets: Arc<receiver::Targets>,
    jobs: Option<Arc<JobService>>,
    verify: Arc<VerifyService>,
    /// The mirror links' tasks: stopped only after the NBD servers, so that
    /// a last FLUSH can reach every mirror.
    links: TaskTracker,
    link_stop: CancellationToken,
    /// The NBD servers, and the first error one stopped with.
    servers: TaskTracker,
    server_error: std::sync::Mutex<Option<std::io::Error>>,
    shutdown: CancellationToken,
    cluster: std::sync::OnceLock<Arc<crate::cluster::Agent>>,
    /// Consistency groups' links to one site.
    groups: std::sync::Mutex<HashMap<(String, SocketAddr), Arc<SiteGroup>>>,
    /// The `[[volume]]` tables of the volumes opened because etcd declares
    /// them here (name, table), in the order they were opened.
    declared: tokio::sync::Mutex<Vec<(String, String)>>,
}

/// Opens one volume: its backend, metadata (marked not clean), mirror
/// states, generation record and replication target.
fn open_volume(cx: &NodeCtx, vc: &VolumeConfig) -> Result<OpenVolume, NodeError> {
    let (config, state_dir, lease) = (&cx.config, &cx.state_dir, &cx.lease);
    if let Some(parent) = vc.path.parent() {
        std::fs::create_dir_all(parent).map_err(|source| NodeError::Io {
            what: format!("volume {}: creating {}", vc.name, parent.display()),
            source,
        })?;
    }
    let opts = FileOptions {
        path: vc.path.clone(),
        size: vc.size,
        direct: vc.direct_io,
        create: true,
        read_only: false,
    };
    let role_cell = RoleCell::new(&vc.name);
    let (disk, failed_before) = LocalDisk::open(
        vc,
        FileBackend::open(&vc.name, &opts)?,
        state_dir,
        role_cell.clone(),
    )?;
    let backend: Arc<dyn Backend> = disk.clone();
    let meta_path = state_dir.join(format!("{}.meta", vc.name));
    let (mut meta, created) =
        meta_file::load_or_create(&meta_path, vc.size, vc.role == Role::Mirror)?;
    if created {
        info!(volume = %vc.name, id = %meta.id_hex(), "new volume");
    } else if !meta.clean {
        warn!(volume = %vc.name, "volume was not shut down cleanly");
    }
    // From here until a clean shutdown, the record says "not clean".
    if meta.clean {
        meta.clean = false;
        meta_file::store(&meta_path, &meta)?;
    }
    if let Some(why) = &failed_before {
        // The local disk failed in an earlier run and was then
        // bypassed (`serve_from_mirror`): it is stale. It comes back
        // as a blank mirror, so whichever node is primary (promote
        // the mirror that took the writes) copies the whole volume
        // to it, as to a replaced disk. The record says blank before
        // the marker goes, so a crash between the two is harmless.
        warn!(volume = %vc.name, reason = %why,
                "the local disk was marked failed in an earlier run: it is stale; starting as \
                 a blank mirror (promote the mirror that holds the data; it copies the whole \
                 volume here)");
    }
    // The role it starts in: the record decides (no label: primary;
    // a new volume's record has its configured role), because
    // `promote` and `demote` (and a returning old primary that found
    // its mirror promoted past it) change roles at run time and a
    // reboot must not undo that: a demoted node never comes back as
    // a second primary, a promoted one stays primary.
    let opened = role_cell
        .feed(Event::Open {
            label: meta.label,
            stale_disk: failed_before.is_some(),
        })
        .expect("a new role cell takes Open");
    let mut park_links = false;
    for a in opened {
        match a {
            Action::StoreDiscard => {
                roles::discard_record(&mut meta);
                meta_file::store(&meta_path, &meta)?;
            }
            Action::ForgetDiskFailure => disk.forget_failure().map_err(|source| NodeError::Io {
                what: format!("volume {}: removing the disk-failed marker", vc.name),
                source,
            })?,
            // Once the links exist, below.
            Action::ParkLinks => park_links = true,
            other => unreachable!("opening a volume asks for {other:?}"),
        }
    }
    let role = role_cell.role();
    if role != vc.role {
        warn!(volume = %vc.name, configured = vc.role.as_str(), role = role.as_str(),
                "the role changed at run time (promote or demote) and stays: starting as {}",
                role.as_str());
    }
    if role == Role::Mirror && config.listen.is_none() {
        warn!(volume = %vc.name,
                "a mirror on a node without `listen`: no primary can feed it; add `listen`");
    }
    info!(volume = %vc.name, generations = %meta.generations.to_display(),
            label = meta.label.as_str(), "volume metadata");
    let meta_cell = Arc::new(MetaCell::new(meta_path.clone(), meta));
    let fence = Arc::new(crate::cluster::fence::Fence::new());
    if let Some(l) = &lease {
        // Before any link exists: none connects, nor takes a
        // primary's link, until the agent has read etcd.
        fence.clustered(l.clone());
    }
    let replicator = if vc.mirrors.is_empty() {
        None
    } else {
        let mut links = Vec::new();
        for m in &vc.mirrors {
            let (store, recovery) = OosStore::open(
                state_dir,
                &vc.name,
                &m.peer,
                vc.size,
                vc.bitmap_granularity,
                DEFAULT_EXTENT_SIZE,
            )?;
            let oos = recovery.bitmap.dirty_bytes();
            match &recovery.outcome {
                RecoveryOutcome::Clean => {
                    info!(volume = %vc.name, peer = %m.peer, out_of_sync = oos, "mirror state recovered")
                }
                RecoveryOutcome::New => {
                    info!(volume = %vc.name, peer = %m.peer, "new mirror: the whole volume will be copied")
                }
                RecoveryOutcome::Crash { replayed_extents } => warn!(
                    volume = %vc.name, peer = %m.peer, replayed_extents, out_of_sync = oos,
                    "last run did not shut down cleanly: active extents marked for resync"
                ),
                RecoveryOutcome::FullResync(why) => warn!(
                    volume = %vc.name, peer = %m.peer, reason = ?why,
                    "mirror state unusable: the whole volume will be copied"
                ),
            }
            let al = ActivityLog::new(DEFAULT_EXTENT_SIZE, DEFAULT_CAPACITY)
                .expect("default activity log settings are valid");
            links.push(Arc::new(MirrorLink::new(
                &vc.name,
                m,
                LinkTuning {
                    timeout: vc.mirror_timeout,
                    resync: vc.resync,
                },
                recovery.bitmap,
                al,
                Arc::new(store),
                backend.clone(),
            )));
        }
        Some(Arc::new(Replicator::new(
            &vc.name,
            links,
            vc.on_mirror_failure,
            vc.track_size,
            {
                let gen =
                    Arc::new(GenState::new(&vc.name, meta_cell.clone()).with_fence(fence.clone()));
                gen.hold_writes_at_start(vc.start_wait);
                gen
            },
            role_cell.clone(),
        )))
    };
    // Every volume of a node with a replication listener can be fed
    // by a primary: a mirror now, a primary after a demote.
    let target = config.listen.is_some().then(|| {
        Arc::new(
            MirrorTarget::new(
                &vc.name,
                meta_cell.clone(),
                backend.clone(),
                ApplyConfig {
                    groups: vc.apply_groups,
                    tasks_per_group: vc.apply_tasks_per_group,
                    ..ApplyConfig::default()
                },
                role_cell.clone(),
            )
            .with_primary_silence(config.primary_silence)
            .with_fence(fence.clone()),
        )
    });
    if let (Some(t), Some(r)) = (&target, &replicator) {
        t.set_own_links(r.links.clone());
    }
    if park_links {
        if let Some(r) = &replicator {
            // Dormant until the volume is promoted here.
            r.start_parked();
        }
    }
    let reads = replicator.as_ref().map(|r| {
        ReadRouter::new(
            &vc.name,
            vc.size,
            vc.read_policy,
            r.links.clone(),
            vc.mirror_timeout,
        )
    });
    let volume = {
        let v = Volume::new(
            &vc.name,
            role_cell,
            backend,
            // `read_only` as it applies to a primary (the config sets
            // it for every mirror-role volume).
            vc.read_only && vc.role == Role::Primary,
            meta_cell.clone(),
            replicator,
        )
        .with_disk(disk, reads)
        .with_tls(vc.tls);
        Arc::new(if config.cluster.is_some() {
            v.with_fence(fence.clone())
        } else {
            v
        })
    };
    Ok(OpenVolume {
        group: vc.consistency_group.clone(),
        fence,
        volume,
        nbd: vc.nbd.clone(),
        meta: meta_cell,
        target,
    })
}

/// Joins the links of each consistency group's volumes to one site into
/// that site's group (made on first use).
fn join_groups<'a>(
    groups: &mut HashMap<(String, SocketAddr), Arc<SiteGroup>>,
    volumes: impl Iterator<Item = (&'a VolumeConfig, &'a OpenVolume)>,
) {
    for (vc, v) in volumes {
        let (Some(name), Some(r)) = (&vc.consistency_group, v.volume.replicator()) else {
            continue;
        };
        for (m, link) in vc.mirrors.iter().zip(&r.links) {
            let g = groups
                .entry((name.clone(), m.addr))
                .or_insert_with(|| SiteGroup::new(name, m.addr));
            let idx = g.join(
                Arc::downgrade(link) as std::sync::Weak<dyn crate::primary::group::GroupMember>
            );
            link.set_group(g.clone(), idx);
        }
    }
}

impl Running {
    /// Waits until every server has stopped (after `shutdown` fired, or an
    /// error), then makes every volume durable and marks it clean.
    pub async fn wait(mut self) -> Result<(), NodeError> {
        let mut first_err = None;
        while let Some(r) = self.tasks.join_next().await {
            let r = r.unwrap_or_else(|e| Err(std::io::Error::other(e)));
            if let Err(e) = r {
                warn!(error = %e, "server stopped with an error");
                first_err.get_or_insert(NodeError::Io {
                    what: "server".into(),
                    source: e,
                });
            }
        }
        // The agent has stopped (no volume is opened any more): the NBD
        // servers finish their connections.
        let live = &self.live;
        live.servers.close();
        live.servers.wait().await;
        if let Some(e) = live.server_error.lock().expect("poisoned").take() {
            first_err.get_or_insert(NodeError::Io {
                what: "NBD server".into(),
                source: e,
            });
        }
        let volumes = live.served.all();
        // No host I/O any more: one last FLUSH to every live mirror, so what
        // they acknowledged is durable there and the next start copies
        // nothing; then close the links.
        for v in &volumes {
            if let Some(r) = v.volume.replicator() {
                if r.flush(|| async { Ok(()) }).await.is_err() {
                    warn!(volume = %v.volume.name(), "final mirror flush failed");
                }
            }
        }
        live.link_stop.cancel();
        live.links.close();
        live.links.wait().await;
        for v in &volumes {
            let backend = v.volume.backend().clone();
            let flushed = tokio::task::spawn_blocking(move || backend.flush())
                .await
                .unwrap_or_else(|e| {
                    Err(StorageError::new(
                        "?",
                        blockmirror_storage::Op::Flush,
                        0,
                        0,
                        std::io::Error::other(e),
                    ))
                });
            if flushed.is_ok() {
                for link in v
                    .volume
                    .replicator()
                    .map(|r| r.links.clone())
                    .unwrap_or_default()
                {
                    let closed = tokio::task::spawn_blocking(move || link.close_clean()).await;
                    match closed {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => warn!(error = %e, "mirror state not closed cleanly"),
                        Err(e) => warn!(error = %e, "mirror state not closed cleanly"),
                    }
                }
            }
            match flushed {
                Ok(()) => {
                    v.volume.meta_cell().update(|m| m.clean = true)?;
                    info!(volume = %v.volume.name(), "volume closed cleanly");
                }
                Err(e) => {
                    warn!(error = %e, "final flush failed; volume left marked unclean");
                    first_err.get_or_insert(e.into());
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// Where the node keeps its durable metadata: `state-<node>` beside the config
/// file, so that two nodes configured from one folder never share it.
pub fn state_dir(config: &NodeConfig) -> PathBuf {
    let dir = config.path.parent().unwrap_or(std::path::Path::new("."));
    dir.join(format!("state-{}", config.node))
}

/// The node's served volumes (the set grows when etcd assigns one here).
#[derive(Default)]
pub(crate) struct ServedSet {
    list: std::sync::RwLock<Vec<Arc<Served>>>,
}

/// A served volume as the admin server sees it.
struct Served {
    volume: Arc<Volume>,
    uri: String,
    target: Option<Arc<MirrorTarget>>,
    /// `consistency_group`.
    group: Option<String>,
}

struct StatusSource {
    node: String,
    /// `[tls]`, for `POST /admin/reload-tls`.
    tls: Option<Arc<TlsStore>>,
    /// Events and chart history, sampled from [`AdminSource::status`].
    observer: Arc<crate::daemon::events::Observer>,
    volumes: Arc<ServedSet>,
    verify: Arc<VerifyService>,
    /// Every metric family, each registered by the module that measures it.
    metrics: metrics::Registry,
    /// Cluster mode's agent.
    cluster: Option<Arc<crate::cluster::Agent>>,
}

/// The role changes the cluster agent asks for, performed as `promote` and
/// `demote` perform them.
struct ClusterRoles {
    volumes: Arc<ServedSet>,
}
