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
                read_token(&a.token_file)?,
                a.open_reads,
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
            match cx.secret.clone() {
                None => warn!(%addr,
                    "`listen` without `secret_file`: no replication link can be authenticated, \
                     so none is accepted"),
                Some(secret) => {
                    let l = tokio::net::TcpListener::bind(addr)
                        .await
                        .map_err(|source| NodeError::Bind {
                            what: "replication".into(),
                            addr: addr.to_string(),
                            source,
                        })?;
                    info!(%addr, "accepting replication links");
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
            Some(t) if t.settings().admin_https => (
                AdminListener::tls(admin_listener, t.clone()).map_err(admin_io)?,
                true,
            ),
            _ => (
                AdminListener::plain(admin_listener).map_err(admin_io)?,
                false,
            ),
        };
        info!(%admin_addr, https, token = self.admin_auth.is_some(), "admin API");
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

/// Binds a volume's NBD listener; returns it with the export's URI.
async fn bind_nbd(v: &OpenVolume) -> Result<(Listener, String), NodeError> {
    let listener = bind_addr(&v.nbd, v.volume.name()).await?;
    let uri = export_uri(&listener, &v.nbd, v.volume.name());
    Ok((listener, uri))
}

async fn bind_addr(nbd: &NbdListen, volume: &str) -> Result<Listener, NodeError> {
    let addr = match nbd {
        NbdListen::Tcp(a) => ListenAddr::Tcp(*a),
        NbdListen::Unix(p) => ListenAddr::Unix(p.clone()),
    };
    Listener::bind(&addr)
        .await
        .map_err(|source| NodeError::Bind {
            what: format!("volume {volume} NBD"),
            addr: nbd.to_string(),
            source,
        })
}

/// The export's URI (the port the listener got, if it asked for 0).
fn export_uri(listener: &Listener, nbd: &NbdListen, volume: &str) -> String {
    match listener.local_addr() {
        Ok(ListenAddr::Tcp(a)) => NbdListen::Tcp(a).uri(volume),
        _ => nbd.uri(volume),
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

impl Live {
    /// Serves `batch`: each volume's NBD export, replication target, job
    /// device, verify entry and mirror links; a consistency group's volumes
    /// come in one batch (the cluster agent makes one unit of them).
    fn serve(self: &Arc<Self>, batch: Vec<(OpenVolume, Listener, String)>) {
        let cx = &self.cx;
        let mut clustered = Vec::new();
        for (v, listener, uri) in batch {
            let mut exports = Exports::new([v.volume.clone()]);
            if let Some(tls) = &cx.tls {
                exports = exports.with_tls(tls.clone() as Arc<dyn blockmirror_nbd::TlsSource>);
            }
            let (sd, live) = (self.shutdown.clone(), Arc::downgrade(self));
            let name = v.volume.name().to_owned();
            self.servers.spawn(async move {
                if let Err(e) = blockmirror_nbd::serve(listener, Arc::new(exports), sd).await {
                    warn!(volume = %name, error = %e, "NBD server stopped with an error");
                    if let Some(l) = live.upgrade() {
                        l.server_error.lock().expect("poisoned").get_or_insert(e);
                    }
                }
            });
            if let Some(t) = &v.target {
                self.targets.insert(t.clone());
                if let Some(j) = &self.jobs {
                    j.add_device(DeviceConstants {
                        volume: t.name.clone(),
                        size: t.identity().size,
                        backend: t.backend.clone(),
                    });
                }
            }
            if let Some(r) = v.volume.replicator() {
                let ctx = LinkContext {
                    tls: cx.tls.clone(),
                    secret: cx
                        .secret
                        .clone()
                        .expect("validated: mirrors need a secret"),
                    node: cx.config.node.clone(),
                    volume: v.volume.name().to_owned(),
                    backend: v.volume.backend().clone(),
                    locks: r.locks.clone(),
                    gen: r.gen.clone(),
                    on_peer_ahead: v.target.clone().map(|t| {
                        let vol = v.volume.clone();
                        Arc::new(move |why: String| {
                            // Host writes stop here (the role is demoting
                            // now), before the link reports back; the rest
                            // of the demote runs on its own. Not a primary:
                            // nothing.
                            let Ok(actions) = vol.role_cell().feed(Event::PeerAhead) else {
                                return;
                            };
                            let (vol, t) = (vol.clone(), t.clone());
                            tokio::spawn(async move {
                                if let Err(e) = finish_demote(&vol, &t, actions, &why).await {
                                    warn!(volume = %vol.name(), error = %e, "demote after finding a newer primary failed");
                                }
                            });
                        }) as Arc<dyn Fn(String) + Send + Sync>
                    }),
                };
                self.verify.add(VerifyVolume {
                    name: v.volume.name().to_owned(),
                    size: v.meta.get().size,
                    links: r.links.clone(),
                    ctx: ctx.clone(),
                });
                if let Some(agent) = self.cluster.get() {
                    r.gen.set_publisher(Arc::new(crate::cluster::Publisher {
                        agent: Arc::downgrade(agent),
                        volume: v.volume.name().to_owned(),
                    }));
                }
                for link in &r.links {
                    let (l, ctx, sd) = (link.clone(), ctx.clone(), self.link_stop.clone());
                    self.links.spawn(async move { l.run(ctx, sd).await });
                    let (l, sd) = (link.clone(), self.link_stop.clone());
                    self.links
                        .spawn(async move { l.persist_periodically(sd).await });
                }
            }
            clustered.push(crate::cluster::ClusterVolume {
                group: v.group.clone(),
                volume: v.volume.clone(),
                target: v.target.clone(),
                fence: v.fence.clone(),
            });
            self.served.push(Served {
                group: v.group,
                volume: v.volume,
                uri,
                target: v.target,
            });
        }
        if let Some(agent) = self.cluster.get() {
            agent.add_volumes(clustered);
        }
    }

    /// Opens and serves the volumes of `tables` (name, `[[volume]]`
    /// table), validated with the node's own config and every volume
    /// declared before them; all or none.
    async fn open_declared(
        self: Arc<Self>,
        tables: Vec<(String, String)>,
    ) -> Result<Vec<String>, String> {
        let mut declared = self.declared.lock().await;
        if self.shutdown.is_cancelled() {
            return Err("the node is shutting down".into());
        }
        let all: String = declared
            .iter()
            .chain(&tables)
            .map(|(_, t)| t.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        let config = self
            .cx
            .config
            .with_volumes(&all)
            .map_err(|e| e.to_string())?;
        let mut batch = Vec::new();
        let mut vcs = Vec::new();
        for (name, _) in &tables {
            let vc = config
                .volume(name)
                .cloned()
                .ok_or_else(|| format!("{name}: not in its own table"))?;
            // The export's address first: a port taken fails the volume
            // before anything is opened.
            let listener = bind_addr(&vc.nbd, name).await.map_err(|e| e.to_string())?;
            let cx = self.cx.clone();
            let opened = {
                let vc = vc.clone();
                tokio::task::spawn_blocking(move || open_volume(&cx, &vc))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?
            };
            let uri = export_uri(&listener, &opened.nbd, name);
            info!(volume = %name, %uri, "serving NBD export (declared in etcd)");
            vcs.push(vc);
            batch.push((opened, listener, uri));
        }
        {
            let mut groups = self.groups.lock().expect("poisoned");
            join_groups(&mut groups, vcs.iter().zip(batch.iter().map(|(v, _, _)| v)));
        }
        self.serve(batch);
        let names = tables.iter().map(|(n, _)| n.clone()).collect();
        declared.extend(tables);
        Ok(names)
    }
}

impl crate::cluster::Host for Live {
    fn served(&self) -> Vec<(String, Option<String>)> {
        self.served
            .all()
            .iter()
            .map(|s| (s.volume.name().to_owned(), s.group.clone()))
            .collect()
    }

    fn open(
        self: Arc<Self>,
        tables: Vec<(String, String)>,
    ) -> crate::cluster::BoxFut<'static, Result<Vec<String>, String>> {
        Box::pin(self.open_declared(tables))
    }
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

/// Promotes `s` here: `promote` by hand, or in cluster mode by the agent
/// once the old primary's lease lapsed (`primary_gone`: a link it may still
/// seem to feed does not count; promoting cuts it).
async fn promote_volume(
    s: &Volume,
    t: &MirrorTarget,
    force: bool,
    primary_gone: bool,
) -> Result<String, ControlError> {
    let volume = s.name();
    let refused = |reason: String| ControlError::Refused {
        volume: volume.to_owned(),
        reason,
    };
    // A promotion or demotion under way finishes first.
    s.role_cell().settled().await;
    // The link is refused first (the role says promoting), so nothing of
    // the old primary lands after the new generation; then the durable
    // record; then the links to this volume's own mirrors; then the
    // export turns read-write (the role says primary).
    let fed = t.primary().filter(|_| !primary_gone);
    let promoted = RoleDriver {
        volume: s,
        target: Some(t),
    }
    .run(Event::Promote {
        force,
        fed: fed.is_some(),
        label: s.meta().label,
    })
    .await;
    match promoted {
        Ok(()) => {}
        Err(DriveError::Role(RoleError::Fed)) => {
            return Err(refused(format!(
                "its primary {} is connected and feeding it; stop that node first, or use --force",
                fed.unwrap_or_default()
            )))
        }
        Err(DriveError::Role(RoleError::Inconsistent)) => return Err(refused(
            "its data is inconsistent (a resync did not finish); use --force to promote it anyway"
                .into(),
        )),
        Err(DriveError::Role(e @ RoleError::Illegal { state, .. })) => {
            return Err(refused(if state.role == roles::Role::Primary {
                "already primary".into()
            } else {
                e.to_string()
            }))
        }
        Err(DriveError::Failed(reason)) => {
            return Err(ControlError::Failed {
                volume: volume.to_owned(),
                reason,
            })
        }
    }
    let m = s.meta();
    let mirrors = match s.replicator() {
        Some(r) => {
            format!(
                "; mirroring to {}",
                r.links
                    .iter()
                    .map(|l| l.peer.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
        None => {
            warn!(volume, "promoted without [[volume.mirror]] tables: nothing mirrors it now, and its old primary cannot fail back to it");
            "; no mirrors configured here (add [[volume.mirror]] for failback)".into()
        }
    };
    warn!(volume, generations = %m.generations.to_display(), forced = force,
        "promoted to primary: the export is read-write, new generation");
    Ok(format!(
        "{volume}: promoted to primary (generation {}); new NBD connections are read-write{mirrors}",
        m.generations.to_display()
    ))
}

/// Promotes several volumes at one point (a consistency group): first every
/// one refuses its old primary and cuts that link, so no volume takes a
/// write of the old primary after another stopped taking them; then each
/// is promoted. One volume: [`promote_volume`].
async fn promote_together(
    members: &[(Arc<Volume>, Arc<MirrorTarget>)],
    force: bool,
    primary_gone: bool,
) -> Result<String, ControlError> {
    if let [(v, t)] = members {
        return promote_volume(v, t, force, primary_gone).await;
    }
    for (v, t) in members {
        if v.role() == Role::Mirror {
            t.cut_link();
        }
    }
    let mut done = Vec::new();
    for (v, t) in members {
        if v.role() == Role::Primary {
            done.push(format!("{}: already primary", v.name()));
            continue;
        }
        match promote_volume(v, t, force, primary_gone).await {
            Ok(m) => done.push(m),
            Err(e) => {
                return Err(ControlError::Failed {
                    volume: v.name().to_owned(),
                    reason: format!(
                        "{e}; promoted before it: {}",
                        if done.is_empty() {
                            "none".into()
                        } else {
                            done.join("; ")
                        }
                    ),
                })
            }
        }
    }
    Ok(done.join("\n"))
}

/// Makes `volume` a mirror on this node: `demote` (`event` Demote), and
/// `resync --discard-local` on a primary (DiscardLocal). New host writes get
/// EPERM at once; the writes in progress finish; every live mirror is
/// flushed and the links park (what they had not confirmed stays marked,
/// and is reported to the next primary as this side's divergent regions);
/// the local disk is flushed; the record says "consistent"; then a primary
/// may connect. (A returning old primary that found its mirror promoted past
/// it does the same, from the link's `on_peer_ahead`.)
async fn demote_volume(
    volume: &Volume,
    target: &MirrorTarget,
    event: Event,
    why: &str,
) -> Result<String, ControlError> {
    let actions = volume
        .role_cell()
        .feed(event)
        .map_err(|_| ControlError::Refused {
            volume: volume.name().to_owned(),
            reason: "already a mirror".into(),
        })?;
    finish_demote(volume, target, actions, why).await
}

/// The rest of a demote: the role already refuses host writes; performs
/// `actions` (what the demoting event returned).
async fn finish_demote(
    volume: &Volume,
    target: &MirrorTarget,
    actions: Vec<Action>,
    why: &str,
) -> Result<String, ControlError> {
    let name = volume.name().to_owned();
    let started = std::time::Instant::now();
    RoleDriver {
        volume,
        target: Some(target),
    }
    .perform_all(actions)
    .await
    .map_err(|e| ControlError::Failed {
        volume: name.clone(),
        reason: e.to_string(),
    })?;
    let m = volume.meta();
    warn!(volume = %name, why, generations = %m.generations.to_display(),
        ms = started.elapsed().as_millis() as u64,
        "demoted: a read-only mirror now, waiting for its new primary to connect");
    Ok(format!(
        "{name}: demoted to mirror (generation {}); the export is read-only; the primary that \
         connects next copies only what differs",
        m.generations.to_display()
    ))
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

impl ServedSet {
    fn push(&self, s: Served) {
        self.list.write().expect("poisoned").push(Arc::new(s));
    }

    /// Every served volume, in the order they were opened.
    fn all(&self) -> Vec<Arc<Served>> {
        self.list.read().expect("poisoned").clone()
    }

    fn find(&self, name: &str) -> Option<Arc<Served>> {
        self.list
            .read()
            .expect("poisoned")
            .iter()
            .find(|s| s.volume.name() == name)
            .cloned()
    }

    fn volumes(&self) -> Vec<Arc<Volume>> {
        self.all().iter().map(|s| s.volume.clone()).collect()
    }
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

impl ClusterRoles {
    fn find(&self, name: &str) -> Result<(Arc<Volume>, Option<Arc<MirrorTarget>>), String> {
        self.volumes
            .find(name)
            .map(|s| (s.volume.clone(), s.target.clone()))
            .ok_or_else(|| format!("{name}: no such volume"))
    }
}

impl crate::cluster::Roles for ClusterRoles {
    fn promote<'a>(
        &'a self,
        volumes: &'a [String],
    ) -> crate::cluster::BoxFut<'a, Result<String, String>> {
        Box::pin(async move {
            let mut members = Vec::new();
            for name in volumes {
                let (v, t) = self.find(name)?;
                let t = t.ok_or("no `listen`: it cannot be promoted")?;
                members.push((v, t));
            }
            promote_together(&members, false, true)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn demote<'a>(
        &'a self,
        volume: &'a str,
        why: String,
    ) -> crate::cluster::BoxFut<'a, Result<String, String>> {
        Box::pin(async move {
            let (v, t) = self.find(volume)?;
            let t = t.ok_or("no `listen`: it cannot be a mirror")?;
            if v.role() != Role::Primary {
                return Ok(format!("{volume}: already a mirror"));
            }
            demote_volume(&v, &t, Event::Demote, &why)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

/// The node's metric registry: the families of each part, in this order,
/// read at each scrape.
fn metrics_registry(
    served: &Arc<ServedSet>,
    verify: &Arc<VerifyService>,
    jobs: Option<&Arc<JobService>>,
    cluster: Option<&Arc<crate::cluster::Agent>>,
) -> metrics::Registry {
    let mut reg = metrics::Registry::default();
    reg.register(
        "blockmirror_up",
        "1 while the node serves (the scrape reached it)",
        prometheus_client::metrics::gauge::ConstGauge::new(1i64),
    );
    let vols: metrics::VolumeList = {
        let s = served.clone();
        Arc::new(move || s.volumes())
    };
    metrics::register(&mut reg, vols.clone());
    crate::primary::link::register_link_metrics(&mut reg, vols.clone());
    let targets = {
        let s = served.clone();
        Arc::new(move || {
            s.all()
                .iter()
                .filter_map(|s| {
                    let t = s.target.as_ref()?;
                    Some((s.volume.name().to_owned(), t.apply_metrics.clone()))
                })
                .collect()
        })
    };
    crate::mirror::apply::register_apply_metrics(&mut reg, targets);
    crate::primary::register_metrics(&mut reg, vols.clone());
    crate::primary::reads::register_metrics(&mut reg, vols);
    verify.register_metrics(&mut reg);
    if let Some(j) = jobs {
        j.register_metrics(&mut reg);
    }
    if let Some(a) = cluster {
        crate::cluster::register_metrics(&mut reg, a.clone());
    }
    reg
}

impl StatusSource {
    /// `resync --discard-local`: this side gives up its data. A mirror again
    /// (writes refused; a primary here is demoted first), blank, so its
    /// primary copies the whole volume, and inconsistent until then.
    fn discard_local(&self, s: &Served) -> Result<String, ControlError> {
        let volume = s.volume.name();
        let Some(t) = &s.target else {
            return Err(ControlError::Refused {
                volume: volume.to_owned(),
                reason: "this node has no `listen` address, so it cannot become a mirror: run \
                         --discard-local on the mirror node whose changes are to be thrown away"
                    .into(),
            });
        };
        // A promotion or demotion under way finishes first.
        let rt = tokio::runtime::Handle::current();
        rt.block_on(s.volume.role_cell().settled());
        if s.volume.role() == Role::Primary {
            // Demoted, then (DemotionStored) discarded.
            rt.block_on(demote_volume(
                &s.volume,
                t,
                Event::DiscardLocal,
                "resync --discard-local",
            ))?;
        } else {
            rt.block_on(
                RoleDriver {
                    volume: &s.volume,
                    target: Some(t),
                }
                .run(Event::DiscardLocal),
            )
            .map_err(|e| ControlError::Failed {
                volume: volume.to_owned(),
                reason: e.to_string(),
            })?;
        }
        let m = s.volume.meta();
        warn!(volume, generations = %m.generations.to_display(),
            "local changes discarded: a mirror again, waiting for a full copy from the primary");
        Ok(format!(
            "{volume}: local changes discarded; read-only mirror, a full resync follows when its primary connects"
        ))
    }

    fn find(&self, volume: &str) -> Result<Arc<Served>, ControlError> {
        self.volumes
            .find(volume)
            .ok_or_else(|| ControlError::UnknownVolume(volume.to_owned()))
    }
}

impl AdminSource for StatusSource {
    fn observer(&self) -> Option<Arc<crate::daemon::events::Observer>> {
        Some(self.observer.clone())
    }

    fn reload_tls(&self) -> Result<String, (u16, String)> {
        let Some(t) = &self.tls else {
            return Err((409, "this node has no [tls] table".into()));
        };
        t.reload().map_err(|e| (500, e.to_string()))?;
        Ok(format!(
            "reloaded {}; new connections use it",
            t.settings().cert.display()
        ))
    }

    fn status(&self) -> NodeStatus {
        NodeStatus {
            node: self.node.clone(),
            volumes: self
                .volumes
                .all()
                .iter()
                .map(|s| &**s)
                .map(
                    |Served {
                         volume: v,
                         uri,
                         target,
                         group,
                     }| VolumeStatus {
                        consistency_group: group.clone(),
                        name: v.name().to_owned(),
                        role: v.role().as_str().to_owned(),
                        size_bytes: v.metrics().size_bytes(),
                        generation: v.generation(),
                        nbd: uri.clone(),
                        read_only: v.read_only(),
                        connections: v.metrics().connections(),
                        mirrors: v
                            .replicator()
                            .filter(|_| v.role() == Role::Primary)
                            .map(|r| {
                                r.links
                                    .iter()
                                    .map(|l| {
                                        let s = l.snapshot();
                                        MirrorStatus {
                                            peer: s.peer,
                                            mode: s.mode.as_str().into(),
                                            connection: s.connection.as_str().into(),
                                            state: s.state.as_str().into(),
                                            out_of_sync_bytes: s.out_of_sync_bytes,
                                            lag_bytes: s.lag_bytes,
                                            lag_seconds: s.lag.as_secs_f64(),
                                            resync_done_bytes: s.resync_done,
                                            resync_total_bytes: s.resync_total,
                                            peer_node: s.peer_node,
                                            inflight_requests: s.inflight as u64,
                                            oldest_request_ms: s
                                                .oldest_inflight
                                                .map_or(0, |d| d.as_millis() as u64),
                                            last_verify: self.verify.status(v.name(), &l.peer),
                                            last_error: s.last_error,
                                            resync_passes: s.passes,
                                            resync_suspension_us: s
                                                .last_suspension
                                                .map(|d| d.as_micros() as u64),
                                            resync_rate_bytes_per_sec: s.resync_rate,
                                            reads_served: v
                                                .reads()
                                                .map_or(0, |r| r.served_by(&l.peer)),
                                        }
                                    })
                                    .collect()
                            })
                            .unwrap_or_default(),
                        primary: target.as_ref().and_then(|t| t.primary()),
                        state: target.as_ref().and_then(|t| t.state()).map(str::to_owned),
                        generations: Some(v.meta().generations.to_display()),
                        applied_bytes: target
                            .as_ref()
                            .map(|t| t.applied_bytes.load(std::sync::atomic::Ordering::Relaxed)),
                        local_disk: v.disk().map(|d| d.state_str().to_owned()),
                        read_policy: v.reads().map(|r| r.policy().as_str().to_owned()),
                        epoch: v.fence().map(|f| f.epoch()),
                    },
                )
                .collect(),
            cluster: self.cluster.as_ref().map(|c| c.status()),
        }
    }

    fn promote(&self, volume: &str, req: &PromoteRequest) -> Result<String, ControlError> {
        let s = self.find(volume)?;
        let refused = |reason: String| ControlError::Refused {
            volume: volume.to_owned(),
            reason,
        };
        let Some(t) = &s.target else {
            return Err(refused(if s.volume.role() == Role::Primary {
                "already primary".into()
            } else {
                "this node has no `listen` address: it cannot be a mirror, nor be promoted".into()
            }));
        };
        tokio::runtime::Handle::current().block_on(promote_volume(&s.volume, t, req.force, false))
    }

    fn promote_group(&self, group: &str, req: &PromoteRequest) -> Result<String, ControlError> {
        let members: Vec<(Arc<Volume>, Arc<MirrorTarget>)> = self
            .volumes
            .all()
            .iter()
            .filter(|s| s.group.as_deref() == Some(group))
            .filter_map(|s| s.target.clone().map(|t| (s.volume.clone(), t)))
            .collect();
        if members.is_empty() {
            return Err(ControlError::UnknownVolume(format!("group {group}")));
        }
        tokio::runtime::Handle::current().block_on(promote_together(&members, req.force, false))
    }

    fn demote(&self, volume: &str, _req: &DemoteRequest) -> Result<String, ControlError> {
        let s = self.find(volume)?;
        let Some(t) = &s.target else {
            return Err(ControlError::Refused {
                volume: volume.to_owned(),
                reason: "this node has no `listen` address, so no primary could feed the volume \
                         as a mirror; add `listen` to its config"
                    .into(),
            });
        };
        tokio::runtime::Handle::current().block_on(demote_volume(
            &s.volume,
            t,
            Event::Demote,
            "demote requested",
        ))
    }

    fn resync(&self, volume: &str, req: &ResyncRequest) -> Result<String, ControlError> {
        let s = self.find(volume)?;
        let refused = |reason: String| ControlError::Refused {
            volume: volume.to_owned(),
            reason,
        };
        if req.discard_local {
            return self.discard_local(&s);
        }
        if s.volume.role() == Role::Primary {
            let Some(r) = s.volume.replicator() else {
                return Err(refused("not mirrored".into()));
            };
            if let Some(rate) = req.rate {
                for l in &r.links {
                    l.set_resync_rate(rate);
                }
            }
            let states: Vec<String> = r
                .links
                .iter()
                .map(|l| {
                    let sn = l.snapshot();
                    format!("{} {}", sn.peer, sn.state.as_str())
                })
                .collect();
            let rate = match req.rate {
                Some(0) => "; resync rate unlimited".to_string(),
                Some(n) => format!("; resync rate {n} bytes/s"),
                None => String::new(),
            };
            return Ok(format!(
                "{volume}: resync runs whenever a mirror connects ({}){rate}",
                states.join(", ")
            ));
        }
        let Some(t) = &s.target else {
            return Err(refused("not mirrored".into()));
        };
        if req.rate.is_some() {
            return Err(refused(
                "--rate is set on the primary, which paces the copy".into(),
            ));
        }
        Ok(format!(
            "{volume}: a mirror is resynced by its primary when it connects (state {})",
            t.state().unwrap_or("primary")
        ))
    }

    fn metrics(&self) -> String {
        metrics::render(&self.metrics)
    }

    fn set_mode(
        &self,
        volume: &str,
        req: &crate::daemon::admin::ModeRequest,
    ) -> Result<Vec<String>, (u16, String)> {
        let mode = crate::daemon::config::MirrorMode::from_name(&req.mode).ok_or_else(|| {
            (
                400,
                format!(
                    "{:?} is not a mode (expected \"sync\" or \"async\")",
                    req.mode
                ),
            )
        })?;
        let served = self
            .volumes
            .find(volume)
            .ok_or_else(|| (404, format!("no volume {volume} on this node")))?;
        let r = served
            .volume
            .replicator()
            .ok_or_else(|| (409, format!("volume {volume} has no mirrors here")))?;
        let links: Vec<_> = r
            .links
            .iter()
            .filter(|l| req.peer.as_deref().is_none_or(|p| p == l.peer))
            .collect();
        if links.is_empty() {
            return Err((404, format!("volume {volume} has no mirror {:?}", req.peer)));
        }
        // Cluster mode: a mirror about to lag is first taken off the
        // record's sync mirrors in step (it could not be promoted without
        // loss any more).
        if let (Some(agent), crate::daemon::config::MirrorMode::Async) = (&self.cluster, mode) {
            let nodes: Vec<String> = links
                .iter()
                .filter_map(|l| l.snapshot().peer_node)
                .collect();
            let handle = tokio::runtime::Handle::current();
            let switch = || {
                for l in &links {
                    l.set_mode(mode);
                }
            };
            tokio::task::block_in_place(|| {
                handle.block_on(agent.switch_to_async(volume, &nodes, switch))
            })
            .map_err(|e| {
                (
                    409,
                    format!("volume {volume}: the cluster record could not be updated first: {e}"),
                )
            })?;
        }
        Ok(links
            .into_iter()
            .map(|l| {
                l.set_mode(mode);
                l.peer.clone()
            })
            .collect())
    }

    fn set_faults(&self, volume: &str, req: &FaultRequest) -> Result<(), (u16, String)> {
        let s = self.find(volume).map_err(|e| (404, e.to_string()))?;
        match s.volume.disk() {
            Some(d) if d.set_faults(req) => {
                warn!(volume, faults = ?req, "injected faults set (fault_injection)");
                Ok(())
            }
            _ => Err((
                409,
                format!("volume {volume}: fault_injection is off (a test-only volume key)"),
            )),
        }
    }

    fn start_verify(&self, volume: &str, req: &VerifyRequest) -> Result<u64, (u16, String)> {
        if let Some(s) = self.volumes.find(volume) {
            if s.volume.role() == Role::Mirror {
                return Err((
                    409,
                    format!("volume {volume} is a mirror on this node: run verify on its primary"),
                ));
            }
        }
        self.verify
            .start(
                volume,
                req.full,
                req.mark,
                req.jobs
                    .unwrap_or(crate::primary::verify::default_jobs(req.full)),
            )
            .map_err(|e| (e.http_status(), e.to_string()))
    }
}
