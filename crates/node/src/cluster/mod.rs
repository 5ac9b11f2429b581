//! Cluster mode: roles decided through etcd (`[cluster]`), never by a
//! consensus of our own.
//!
//! - The node holds a lease ([`fence::LeaseClock`]) and registers under it.
//! - Each volume's primary holds a lease-backed key with a fencing epoch,
//!   taken in one transaction that also raises the epoch in the volume's
//!   record ([`records`]). The epoch travels in every link's handshake;
//!   a mirror refuses a primary, and every frame of a link, older than the
//!   newest epoch it knows.
//! - A primary whose lease is not trusted any more stops acknowledging
//!   host writes ([`fence::Fence::may_ack`]) before etcd can let the key go.
//! - A primary publishes each new generation in the record before it
//!   acknowledges a write under it, with the sync mirrors in step with it;
//!   when the key lapses, the best eligible mirror
//!   ([`blockmirror_core::cluster::choose`]) takes the next epoch in one
//!   transaction and is promoted. The old primary, back, finds a newer
//!   epoch, demotes itself and is resynced by the new one (the failback that
//!   static mode has).
//!
//! The decisions are pure (`blockmirror_core::cluster`); this module reads
//! etcd, runs them and applies them.

mod assign;
pub mod client;
mod endpoints;
pub mod fence;
mod lease;
mod metrics;
mod reconcile;
pub mod records;
pub mod spec;
mod unit;

pub use client::{read_view, ClusterView};
use endpoints::Endpoints;
pub use metrics::register_metrics;
pub use unit::Unit;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blockmirror_core::cluster::{self as decide, DataState, Decision};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use blockmirror_nbd::Export;

use crate::daemon::config::{ClusterConfig, MirrorMode, Role};
use crate::mirror::receiver::MirrorTarget;
use crate::volume::Volume;
use fence::{Fence, LeaseClock};
use records::{
    decode, encode, gen_hex, KeyEntry, Keys, NodeEntry, RecordEntry, ReportEntry, FORMAT,
};

/// A boxed future, for the callbacks into the node.
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the agent asks of the node: the role changes `promote` and
/// `demote` perform by hand.
pub trait Roles: Send + Sync {
    /// Promotes `volumes` here, together (one volume, or a consistency
    /// group's: every link of the old primary is cut before any is
    /// promoted); their old primary is gone: its lease lapsed.
    fn promote<'a>(&'a self, volumes: &'a [String]) -> BoxFut<'a, Result<String, String>>;
    /// Demotes `volume` here (a newer epoch is held elsewhere).
    fn demote<'a>(&'a self, volume: &'a str, why: String) -> BoxFut<'a, Result<String, String>>;
}

/// What the agent asks of the node for volumes declared in etcd.
pub trait Host: Send + Sync {
    /// Every volume the node serves, with its consistency group.
    fn served(&self) -> Vec<(String, Option<String>)>;
    /// Opens and serves these volumes (name, `[[volume]]` table), all or
    /// none; Ok: their names.
    fn open(
        self: Arc<Self>,
        tables: Vec<(String, String)>,
    ) -> BoxFut<'static, Result<Vec<String>, String>>;
}

/// One volume under cluster mode.
pub struct ClusterVolume {
    pub volume: Arc<Volume>,
    /// `consistency_group`: the volumes of a group fail over as one.
    pub group: Option<String>,
    pub target: Option<Arc<MirrorTarget>>,
    pub fence: Arc<Fence>,
}

/// Counters for /metrics and /status.
#[derive(Debug, Default)]
pub struct ClusterCounters {
    /// Promotions this node made automatically, and of those, lossy ones
    /// (an async or out-of-step mirror, `auto_promote = "any"`).
    pub promotions: AtomicU64,
    pub lossy_promotions: AtomicU64,
    /// Times this node stepped down for a newer epoch.
    pub step_downs: AtomicU64,
    /// Lease losses (not renewed in time).
    pub lease_losses: AtomicU64,
}

/// The node's cluster agent.
pub struct Agent {
    cfg: ClusterConfig,
    node: String,
    keys: Keys,
    entry: NodeEntry,
    pub lease: Arc<LeaseClock>,
    lease_id: AtomicI64,
    connected: AtomicBool,
    etcd: Endpoints,
    volumes: std::sync::RwLock<Vec<Arc<ClusterVolume>>>,
    /// What fails over as one: a volume, or a consistency group.
    units: std::sync::RwLock<Vec<Arc<Unit>>>,
    roles: Arc<dyn Roles>,
    /// The node, for volumes declared in etcd.
    host: std::sync::OnceLock<std::sync::Weak<dyn Host>>,
    pub counters: ClusterCounters,
    /// Per volume: the report last put, so an unchanged one is not put again.
    reported: Mutex<HashMap<String, (i64, ReportEntry)>>,
    /// Per volume: the record this node last published as its primary.
    published: Mutex<HashMap<String, RecordEntry>>,
    /// Wakes the reconcile loop (a lease change, a publish).
    kick: tokio::sync::Notify,
    /// Held while a record is published, and across a switch to async
    /// ([`Agent::switch_to_async`]), so no publish lists a mirror in step
    /// that is switching.
    publishing: tokio::sync::Mutex<()>,
    /// Per unit: the last reconcile error, logged once.
    last_error: Mutex<HashMap<String, String>>,
}

/// How long one etcd request may take.
fn request_timeout(ttl: Duration) -> Duration {
    (ttl / 4).max(Duration::from_millis(500))
}

/// A loop's watch of every key under one prefix: opened when missing (one
/// bounded try per turn of the loop), dropped when its stream ends.
#[derive(Default)]
struct PrefixWatch {
    stream: Option<etcd_client::WatchStream>,
}

impl PrefixWatch {
    /// Opens the watch if it is not open; etcd not answering in time leaves
    /// it closed until the next turn.
    async fn ensure(&mut self, client: &mut Client, prefix: String, ttl: Duration) {
        if self.stream.is_some() {
            return;
        }
        let w = tokio::time::timeout(
            request_timeout(ttl),
            client.watch(prefix, Some(WatchOptions::new().with_prefix())),
        )
        .await;
        if let Ok(Ok(stream)) = w {
            self.stream = Some(stream);
        }
    }

    /// The next change; never, while closed. A failed stream is dropped
    /// (reopened next turn).
    async fn changed(&mut self) {
        match &mut self.stream {
            Some(w) => {
                if w.message().await.is_err() {
                    self.stream = None;
                }
            }
            None => std::future::pending().await,
        }
    }
}

impl Agent {
    /// `lease`: the clock every volume's fence was put under at open
    /// ([`Fence::clustered`]), before any link could start.
    pub fn new(
        cfg: ClusterConfig,
        lease: Arc<LeaseClock>,
        node: &str,
        admin: std::net::SocketAddr,
        listen: Option<std::net::SocketAddr>,
        volumes: Vec<ClusterVolume>,
        roles: Arc<dyn Roles>,
    ) -> Arc<Self> {
        for v in &volumes {
            v.fence.clustered(lease.clone());
        }
        let volumes: Vec<Arc<ClusterVolume>> = volumes.into_iter().map(Arc::new).collect();
        let etcd = Endpoints::new(&cfg.etcd, request_timeout(cfg.lease_ttl));
        let units = Unit::all(&volumes).into_iter().map(Arc::new).collect();
        Arc::new(Self {
            keys: Keys {
                prefix: cfg.prefix.clone(),
            },
            entry: NodeEntry {
                v: FORMAT,
                site: cfg.site.clone(),
                admin: admin.to_string(),
                listen: listen.map(|l| l.to_string()),
            },
            cfg,
            node: node.to_owned(),
            lease,
            lease_id: AtomicI64::new(0),
            connected: AtomicBool::new(false),
            etcd,
            volumes: std::sync::RwLock::new(volumes),
            units: std::sync::RwLock::new(units),
            roles,
            host: std::sync::OnceLock::new(),
            counters: ClusterCounters::default(),
            reported: Mutex::new(HashMap::new()),
            published: Mutex::new(HashMap::new()),
            kick: tokio::sync::Notify::new(),
            publishing: tokio::sync::Mutex::new(()),
            last_error: Mutex::new(HashMap::new()),
        })
    }

    /// The node, for the volumes etcd declares here.
    pub fn set_host(&self, host: std::sync::Weak<dyn Host>) {
        let _ = self.host.set(host);
    }

    /// Puts volumes opened while the node runs under the agent (a
    /// consistency group's volumes come together: they make one unit).
    pub fn add_volumes(&self, volumes: Vec<ClusterVolume>) {
        if volumes.is_empty() {
            return;
        }
        let volumes: Vec<Arc<ClusterVolume>> = volumes
            .into_iter()
            .map(|v| {
                v.fence.clustered(self.lease.clone());
                Arc::new(v)
            })
            .collect();
        let units = Unit::all(&volumes);
        self.volumes.write().expect("poisoned").extend(volumes);
        self.units
            .write()
            .expect("poisoned")
            .extend(units.into_iter().map(Arc::new));
        self.kick.notify_one();
    }

    fn volumes(&self) -> Vec<Arc<ClusterVolume>> {
        self.volumes.read().expect("poisoned").clone()
    }

    fn units(&self) -> Vec<Arc<Unit>> {
        self.units.read().expect("poisoned").clone()
    }

    fn unit_of(&self, volume: &str) -> Option<Arc<Unit>> {
        self.units
            .read()
            .expect("poisoned")
            .iter()
            .find(|u| u.members.iter().any(|m| m.volume.name() == volume))
            .cloned()
    }

    /// The node-wide part of /status.
    pub fn status(&self) -> crate::daemon::status::ClusterStatus {
        let c = &self.counters;
        crate::daemon::status::ClusterStatus {
            etcd_connected: self.connected.load(Ordering::Relaxed),
            lease_ok: self.lease.valid(),
            site: self.cfg.site.clone(),
            auto_promote: self.cfg.auto_promote.as_str().into(),
            lease_ttl_ms: self.cfg.lease_ttl.as_millis() as u64,
            lease_remaining_ms: self.lease.remaining().as_millis() as u64,
            promotions: c.promotions.load(Ordering::Relaxed),
            lossy_promotions: c.lossy_promotions.load(Ordering::Relaxed),
            step_downs: c.step_downs.load(Ordering::Relaxed),
            lease_losses: c.lease_losses.load(Ordering::Relaxed),
        }
    }

    fn ttl_secs(&self) -> i64 {
        self.cfg.lease_ttl.as_secs().max(2) as i64
    }

    /// A client of a member that answered last (waits until one does).
    async fn client(&self, shutdown: &CancellationToken) -> Option<(usize, Client)> {
        let mut backoff = Duration::from_millis(100);
        loop {
            if let Some(c) = self.etcd.get().await {
                return Some(c);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// Runs until `shutdown`: the lease, and the reconcile loop.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        if self.client(&shutdown).await.is_none() {
            return;
        }
        let lease = {
            let (a, sd) = (self.clone(), shutdown.clone());
            tokio::spawn(async move { a.keep_lease(sd).await })
        };
        let assign = {
            let (a, sd) = (self.clone(), shutdown.clone());
            tokio::spawn(async move { a.assign_loop(sd).await })
        };
        self.reconcile_loop(shutdown.clone()).await;
        let _ = lease.await;
        let _ = assign.await;
        // A clean stop: give the keys up at once, so that a mirror need not
        // wait for the lease to lapse.
        let id = self.lease_id.load(Ordering::SeqCst);
        for v in &self.volumes() {
            v.fence.release();
        }
        if let (true, Some((_, mut c))) = (id != 0, self.etcd.get().await) {
            let _ = tokio::time::timeout(Duration::from_secs(1), c.lease_revoke(id)).await;
            info!("cluster lease revoked on shutdown");
        }
    }
}

/// The bridge from a volume's generation record to the agent.
pub struct Publisher {
    pub agent: std::sync::Weak<Agent>,
    pub volume: String,
}

impl crate::primary::gen_state::Publish for Publisher {
    fn publish(&self) -> BoxFut<'_, Result<(), String>> {
        Box::pin(async move {
            match self.agent.upgrade() {
                Some(a) => a.publish_now(&self.volume).await,
                None => Err("the cluster agent stopped".into()),
            }
        })
    }
}

/// A mirror's label as a report's data state.
pub trait LabelView {
    fn view(&self) -> DataState;
}

impl LabelView for blockmirror_core::MirrorLabel {
    fn view(&self) -> DataState {
        match self {
            blockmirror_core::MirrorLabel::InSync => DataState::InSync,
            blockmirror_core::MirrorLabel::Inconsistent => DataState::Inconsistent,
            _ => DataState::Consistent,
        }
    }
}
