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

use blockmirror_core::VolumeMeta;
use blockmirror_nbd::{Export, Exports, ListenAddr, Listener};
use blockmirror_storage::{Backend, FileBackend, FileOptions, StorageError};
use thiserror::Error;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin::{self, AdminSource};
use crate::config::{NbdListen, NodeConfig};
use crate::meta_file::{self, MetaFileError};
use crate::metrics;
use crate::status::{NodeStatus, VolumeStatus};
use crate::volume::Volume;

#[derive(Debug, Error)]
pub enum NodeError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Meta(#[from] MetaFileError),
    #[error("cannot listen on {addr} for {what}: {source}")]
    Bind {
        what: String,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

struct OpenVolume {
    volume: Arc<Volume>,
    nbd: NbdListen,
    meta_path: PathBuf,
    meta: VolumeMeta,
}

/// A node whose volumes are open but not yet served.
pub struct Node {
    config: NodeConfig,
    volumes: Vec<OpenVolume>,
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
    volumes: Vec<OpenVolume>,
}

impl Node {
    /// Opens every volume's backend and metadata.
    pub fn open(config: NodeConfig) -> Result<Node, NodeError> {
        let state_dir = state_dir(&config);
        let mut volumes = Vec::new();
        for vc in &config.volumes {
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
            let backend: Arc<dyn Backend> = Arc::new(FileBackend::open(&vc.name, &opts)?);
            let meta_path = state_dir.join(format!("{}.meta", vc.name));
            let (mut meta, created) = meta_file::load_or_create(&meta_path, vc.size)?;
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
            let volume = Arc::new(Volume::new(
                &vc.name,
                vc.role,
                backend,
                vc.read_only,
                meta.generation_string(),
            ));
            volumes.push(OpenVolume {
                volume,
                nbd: vc.nbd.clone(),
                meta_path,
                meta,
            });
        }
        Ok(Node { config, volumes })
    }

    /// Binds every listener and starts serving; `shutdown` stops it all.
    pub async fn start(self, shutdown: CancellationToken) -> Result<Running, NodeError> {
        let mut tasks = JoinSet::new();
        let mut exports = Vec::new();
        let mut listeners = Vec::new();
        for v in &self.volumes {
            let addr = match &v.nbd {
                NbdListen::Tcp(a) => ListenAddr::Tcp(*a),
                NbdListen::Unix(p) => ListenAddr::Unix(p.clone()),
            };
            let listener = Listener::bind(&addr)
                .await
                .map_err(|source| NodeError::Bind {
                    what: format!("volume {} NBD", v.volume.name()),
                    addr: v.nbd.to_string(),
                    source,
                })?;
            let uri = match listener.local_addr() {
                Ok(ListenAddr::Tcp(a)) => NbdListen::Tcp(a).uri(v.volume.name()),
                _ => v.nbd.uri(v.volume.name()),
            };
            exports.push((v.volume.name().to_owned(), uri));
            listeners.push((listener, v.volume.clone()));
        }
        let admin_listener = tokio::net::TcpListener::bind(self.config.admin)
            .await
            .map_err(|source| NodeError::Bind {
                what: "admin HTTP".into(),
                addr: self.config.admin.to_string(),
                source,
            })?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|source| NodeError::Io {
                what: "admin listener address".into(),
                source,
            })?;

        for (listener, volume) in listeners {
            let sd = shutdown.clone();
            let exports = Arc::new(Exports::new([volume]));
            tasks.spawn(blockmirror_nbd::serve(listener, exports, sd));
        }
        let source = Arc::new(StatusSource {
            node: self.config.node.clone(),
            volumes: self
                .volumes
                .iter()
                .zip(&exports)
                .map(|(v, (_, uri))| (v.volume.clone(), uri.clone()))
                .collect(),
        });
        let sd = shutdown.clone();
        tasks.spawn(admin::serve(admin_listener, source, async move {
            sd.cancelled().await
        }));

        for (name, uri) in &exports {
            info!(volume = %name, %uri, "serving NBD export");
        }
        info!(admin = %admin_addr, node = %self.config.node, "node running");
        Ok(Running {
            endpoints: Endpoints {
                admin: admin_addr,
                exports,
            },
            tasks,
            volumes: self.volumes,
        })
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
        for v in &mut self.volumes {
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
            match flushed {
                Ok(()) => {
                    v.meta.clean = true;
                    meta_file::store(&v.meta_path, &v.meta)?;
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

struct StatusSource {
    node: String,
    volumes: Vec<(Arc<Volume>, String)>,
}

impl AdminSource for StatusSource {
    fn status(&self) -> NodeStatus {
        NodeStatus {
            node: self.node.clone(),
            volumes: self
                .volumes
                .iter()
                .map(|(v, uri)| VolumeStatus {
                    name: v.name().to_owned(),
                    role: v.role().as_str().to_owned(),
                    size_bytes: v.metrics().size_bytes(),
                    generation: v.generation().to_owned(),
                    nbd: uri.clone(),
                    read_only: v.read_only(),
                    connections: v.metrics().connections(),
                    mirrors: Vec::new(),
                    primary: None,
                })
                .collect(),
        }
    }

    fn metrics(&self) -> String {
        let all: Vec<&metrics::VolumeMetrics> =
            self.volumes.iter().map(|(v, _)| v.metrics()).collect();
        metrics::render_all(&all)
    }
}
