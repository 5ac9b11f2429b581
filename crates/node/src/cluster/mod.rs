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
pub mod fence;
pub mod records;
pub mod spec;

pub use client::{read_view, ClusterView};

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

    /// Grants the lease, keeps it alive, grants a new one when it is lost.
    async fn keep_lease(&self, shutdown: CancellationToken) {
        let ttl = self.cfg.lease_ttl;
        let timeout = request_timeout(ttl);
        let every = ttl / 3;
        'grant: while !shutdown.is_cancelled() {
            let Some((mut at, mut client)) = self.client(&shutdown).await else {
                return;
            };
            let sent = Instant::now();
            let granted =
                tokio::time::timeout(timeout, client.lease_grant(self.ttl_secs(), None)).await;
            let id = match granted {
                Ok(Ok(r)) if r.ttl() > 0 => {
                    self.lease
                        .renewed(sent, Duration::from_secs(r.ttl() as u64));
                    r.id()
                }
                other => {
                    self.connected.store(false, Ordering::Relaxed);
                    self.etcd.failed(at);
                    debug!(result = ?other.map(|r| r.map(|_| ())), "lease grant failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(200)) => continue 'grant,
                    }
                }
            };
            self.connected.store(true, Ordering::Relaxed);
            self.lease_id.store(id, Ordering::SeqCst);
            let put = client
                .put(
                    self.keys.node(&self.node),
                    encode(&self.entry),
                    Some(PutOptions::new().with_lease(id)),
                )
                .await;
            if let Err(e) = put {
                warn!(error = %e, "registering the node in etcd failed");
            }
            // The address book of declared volumes (no lease: a node that
            // is down is still their peer).
            if let Err(e) = client
                .put(self.keys.member(&self.node), encode(&self.entry), None)
                .await
            {
                warn!(error = %e, "registering the node's address in etcd failed");
            }
            info!(
                lease = format!("{id:x}"),
                ttl_ms = ttl.as_millis() as u64,
                "cluster lease granted"
            );
            self.kick.notify_one();
            // Keep it alive: one keep-alive every ttl/3; the answer to each
            // renews the clock from when it was sent.
            let mut stream = None;
            loop {
                if stream.is_none() {
                    // Another member than the one that failed, if any.
                    if let Some((i, c)) = self.etcd.get().await {
                        (at, client) = (i, c);
                    }
                    match tokio::time::timeout(timeout, client.lease_keep_alive(id)).await {
                        Ok(Ok(s)) => stream = Some(s),
                        _ => {
                            self.connected.store(false, Ordering::Relaxed);
                            self.etcd.failed(at);
                        }
                    }
                }
                if let Some((keeper, answers)) = &mut stream {
                    let sent = Instant::now();
                    let answered = tokio::time::timeout(timeout, async {
                        keeper.keep_alive().await?;
                        answers.message().await
                    })
                    .await;
                    match answered {
                        Ok(Ok(Some(r))) if r.ttl() > 0 => {
                            self.connected.store(true, Ordering::Relaxed);
                            self.lease
                                .renewed(sent, Duration::from_secs(r.ttl() as u64));
                        }
                        Ok(Ok(Some(_))) => {
                            warn!(
                                lease = format!("{id:x}"),
                                "the cluster lease expired in etcd"
                            );
                            break;
                        }
                        _ => {
                            self.connected.store(false, Ordering::Relaxed);
                            self.etcd.failed(at);
                            stream = None;
                        }
                    }
                }
                if !self.lease.valid() {
                    break;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(if stream.is_some() { every } else { Duration::from_millis(100) }) => {}
                }
            }
            // Lost: every key under it is gone (or soon will be); nothing
            // here acknowledges a write any more.
            self.lease.expire();
            self.lease_id.store(0, Ordering::SeqCst);
            self.counters.lease_losses.fetch_add(1, Ordering::Relaxed);
            for v in &self.volumes() {
                if v.fence.holds() != 0 {
                    warn!(volume = %v.volume.name(), epoch = v.fence.holds(),
                        "cluster lease not renewed in time: host writes are no longer acknowledged here");
                }
                v.fence.release();
            }
            self.kick.notify_one();
        }
    }

    async fn reconcile_loop(&self, shutdown: CancellationToken) {
        let tick = (self.cfg.lease_ttl / 10).max(Duration::from_millis(100));
        let mut watch = None;
        // A link, role or mirror state moved here: reconcile now, so that a
        // mirror coming into step is in the record at once (until then it
        // cannot be promoted without loss).
        let mut pokes = crate::daemon::events::pokes();
        loop {
            let Some((at, mut client)) = self.client(&shutdown).await else {
                return;
            };
            if watch.is_none() {
                let w = tokio::time::timeout(
                    request_timeout(self.cfg.lease_ttl),
                    client.watch(self.keys.volumes(), Some(WatchOptions::new().with_prefix())),
                )
                .await;
                if let Ok(Ok(stream)) = w {
                    watch = Some(stream);
                }
            }
            for u in &self.units() {
                let r = self.reconcile(&mut client, u).await;
                if r.is_err() {
                    // Perhaps this member is down or cut off: ask the next.
                    self.etcd.failed(at);
                }
                let mut last = self.last_error.lock().expect("poisoned");
                match r {
                    // Once per distinct error, not every tick of an outage.
                    Err(e) if last.get(&u.name) != Some(&e) => {
                        warn!(unit = %u.name, error = %e, "cluster reconcile failed; retrying");
                        last.insert(u.name.clone(), e);
                    }
                    Err(e) => debug!(unit = %u.name, error = %e, "cluster reconcile failed again"),
                    Ok(()) => {
                        last.remove(&u.name);
                    }
                }
            }
            let changed = async {
                match &mut watch {
                    Some(w) => w.message().await.map(|_| ()).map_err(|_| ()),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = changed => if r.is_err() { watch = None },
                _ = self.kick.notified() => {}
                _ = pokes.changed() => {}
                _ = tokio::time::sleep(tick) => {}
            }
        }
    }

    /// One unit (a volume or a group): read what etcd holds of it, decide, act.
    async fn reconcile(&self, client: &mut Client, v: &Unit) -> Result<(), String> {
        let name = v.name.as_str();
        let got = client
            .get(
                self.keys.unit(&v.base),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .map_err(|e| e.to_string())?;
        let mut record: Option<(RecordEntry, i64)> = None;
        let mut key: Option<KeyEntry> = None;
        let mut key_lease = 0;
        let mut reports = Vec::new();
        for kv in got.kvs() {
            let k = kv.key_str().map_err(|e| e.to_string())?;
            let Some(rest) = k.strip_prefix(&self.keys.unit(&v.base)) else {
                continue;
            };
            match rest {
                "record" => match decode::<RecordEntry>(kv.value()) {
                    Ok(r) => record = Some((r, kv.mod_revision())),
                    Err(e) => return Err(format!("{k}: {e}")),
                },
                "primary" => match decode::<KeyEntry>(kv.value()) {
                    Ok(e) => {
                        key_lease = kv.lease();
                        key = Some(e)
                    }
                    Err(e) => return Err(format!("{k}: {e}")),
                },
                other => {
                    if let Some(node) = other.strip_prefix("mirrors/") {
                        match decode::<ReportEntry>(kv.value()) {
                            Ok(r) => {
                                if let Some(r) = r.to_core(node) {
                                    reports.push(r);
                                }
                            }
                            Err(e) => warn!(key = k, error = %e, "unreadable mirror report"),
                        }
                    }
                }
            }
        }
        let lease = self.lease_id.load(Ordering::SeqCst);
        let primary_here = v.primary_here();
        // A mirror learns the newest epoch (and cuts an older primary).
        if let Some((r, _)) = &record {
            v.raise(r.epoch);
        }
        v.mark_synced();
        // My own report, from my state now (not what etcd has of me).
        let mine = self.local_report(v);
        reports.retain(|r| r.node != self.node);
        if let Some(m) = &mine {
            reports.push(m.clone());
            if lease != 0 {
                self.put_report(client, name, &v.base, m, lease).await?;
            }
        } else if self
            .reported
            .lock()
            .expect("poisoned")
            .remove(name)
            .is_some()
        {
            // Primary here now: it is no mirror any more.
            client
                .delete(self.keys.report(&v.base, &self.node), None)
                .await
                .map_err(|e| e.to_string())?;
        }
        if lease == 0 || !self.lease.valid() {
            return Ok(());
        }
        let core_record = match &record {
            Some((r, _)) => Some(
                r.to_core()
                    .ok_or_else(|| format!("{name}: unreadable generation in the record"))?,
            ),
            None => None,
        };
        let holds = v.holds();
        let local = decide::Local {
            node: &self.node,
            primary: primary_here,
            holds: (holds != 0).then_some(holds),
        };
        let primary_alive = match &core_record {
            Some(r) if r.primary != self.node && key.is_none() => {
                !reports.iter().any(|m| m.node == r.primary)
                    && client
                        .get(self.keys.node(&r.primary), None)
                        .await
                        .map_err(|e| e.to_string())?
                        .count()
                        > 0
            }
            _ => false,
        };
        let view = decide::View {
            record: core_record.as_ref(),
            key: key.as_ref().map(|k| (k.node.as_str(), k.epoch)),
            reports: &reports,
            primary_alive,
        };
        let decision = decide::decide(&local, &view, self.cfg.auto_promote);
        match decision {
            Decision::Stay => {
                if primary_here && holds != 0 {
                    // Publish what changed (a mirror came into step).
                    self.publish(client, v, false).await?;
                } else if let Some(k) = key.as_ref().filter(|k| {
                    primary_here && holds == 0 && k.node == self.node && key_lease == lease
                }) {
                    // The key is ours under this lease but the fence was not
                    // lifted (the publish after taking it failed): finish.
                    self.publish(client, v, true).await?;
                    info!(
                        volume = name,
                        epoch = k.epoch,
                        "cluster: primary key held; host writes acknowledged again"
                    );
                    v.hold(k.epoch);
                }
                Ok(())
            }
            Decision::Bootstrap => {
                let rec = self.new_record(v, 1, &[]);
                let txn = Txn::new()
                    .when([
                        Compare::version(self.keys.record(&v.base), CompareOp::Equal, 0),
                        Compare::version(self.keys.primary(&v.base), CompareOp::Equal, 0),
                    ])
                    .and_then(self.take_ops(&v.base, &rec, lease));
                if client
                    .txn(txn)
                    .await
                    .map_err(|e| e.to_string())?
                    .succeeded()
                {
                    info!(
                        volume = name,
                        epoch = 1,
                        "cluster: first primary of the volume"
                    );
                    self.took(v, rec);
                }
                Ok(())
            }
            Decision::Reacquire { epoch } => {
                let (old, rev) = record.clone().expect("decided on a record");
                let gen = v.generation();
                let keep: Vec<String> = if gen_hex(gen) == old.generation {
                    old.sync_mirrors.clone()
                } else {
                    Vec::new()
                };
                let mut rec = self.new_record(v, epoch, &keep);
                rec.parents = old.volumes.clone();
                if self.take(client, &v.base, &rec, rev, lease).await? {
                    info!(volume = name, epoch, "cluster: primary key taken again");
                    self.took(v, rec);
                }
                Ok(())
            }
            Decision::StepDown { by, epoch } => {
                v.release();
                self.counters.step_downs.fetch_add(1, Ordering::Relaxed);
                let why = format!("cluster: {by} holds epoch {epoch}");
                warn!(volume = name, %by, epoch, "a newer primary holds the volume: demoting here");
                let parents = record
                    .as_ref()
                    .map(|(r, _)| r.parents.clone())
                    .unwrap_or_default();
                for m in &v.members {
                    if m.volume.role() == Role::Primary {
                        if let Some(p) = parents
                            .get(m.volume.name())
                            .and_then(|g| records::parse_gen(g))
                        {
                            roll_back(m, p).await;
                        }
                        self.roles.demote(m.volume.name(), why.clone()).await?;
                    }
                }
                Ok(())
            }
            Decision::Promote { epoch, lossless } => {
                let (old, rev) = record.clone().expect("decided on a record");
                // Until this node publishes a generation of its own, the
                // old primary's other sync mirrors stay as good as it.
                let others: Vec<String> = old
                    .sync_mirrors
                    .iter()
                    .filter(|n| **n != self.node)
                    .cloned()
                    .collect();
                let mut rec = self.new_record(v, epoch, &others);
                rec.generation = old.generation.clone();
                rec.parents = old.volumes.clone();
                if !self.take(client, &v.base, &rec, rev, lease).await? {
                    return Ok(());
                }
                // What later publishes keep of this epoch (its parents).
                self.published
                    .lock()
                    .expect("poisoned")
                    .insert(name.to_owned(), rec.clone());
                let started = Instant::now();
                v.raise(epoch);
                if lossless {
                    warn!(volume = name, old = %old.primary, epoch,
                        "cluster: the primary's lease lapsed; promoting this in-step sync mirror");
                } else {
                    warn!(volume = name, old = %old.primary, epoch, published = %old.generation,
                        "cluster: the primary's lease lapsed; promoting this mirror, which may lack \
                         its last writes (auto_promote = \"any\"): that data window is given up");
                    self.counters
                        .lossy_promotions
                        .fetch_add(1, Ordering::Relaxed);
                }
                match self.roles.promote(&v.volume_names()).await {
                    Ok(msg) => {
                        self.counters.promotions.fetch_add(1, Ordering::Relaxed);
                        info!(
                            volume = name,
                            ms = started.elapsed().as_millis() as u64,
                            "{msg}"
                        );
                        self.publish(client, v, true).await?;
                        v.hold(epoch);
                        Ok(())
                    }
                    Err(e) => {
                        // Give the key back, so that another mirror may try.
                        let _ = client.delete(self.keys.primary(&v.base), None).await;
                        Err(format!("promotion failed: {e}"))
                    }
                }
            }
            Decision::NoCandidate => {
                let r = core_record.expect("decided on a record");
                let why: Vec<String> = reports
                    .iter()
                    .filter(|m| m.node != r.primary)
                    .map(|m| match decide::candidacy(&r, m, self.cfg.auto_promote) {
                        Ok(_) => format!("{}: eligible", m.node),
                        Err(e) => format!("{}: {e}", m.node),
                    })
                    .collect();
                debug!(volume = name, primary = %r.primary, mirrors = ?why,
                    "the primary's key lapsed and no mirror may be promoted automatically");
                Ok(())
            }
        }
    }

    /// The record this node would publish as primary at `epoch`.
    fn new_record(&self, v: &Unit, epoch: u64, sync: &[String]) -> RecordEntry {
        RecordEntry {
            v: FORMAT,
            epoch,
            primary: self.node.clone(),
            generation: gen_hex(v.generation()),
            sync_mirrors: sync.to_vec(),
            volumes: v.volume_generations(),
            parents: Default::default(),
        }
    }

    fn take_ops(&self, base: &str, rec: &RecordEntry, lease: i64) -> Vec<TxnOp> {
        let key = KeyEntry {
            v: FORMAT,
            node: self.node.clone(),
            epoch: rec.epoch,
        };
        vec![
            TxnOp::put(self.keys.record(base), encode(rec), None),
            TxnOp::put(
                self.keys.primary(base),
                encode(&key),
                Some(PutOptions::new().with_lease(lease)),
            ),
        ]
    }

    /// Takes the primary key at `rec.epoch`, if nobody holds it and the
    /// record is still the one decided on.
    async fn take(
        &self,
        client: &mut Client,
        base: &str,
        rec: &RecordEntry,
        record_rev: i64,
        lease: i64,
    ) -> Result<bool, String> {
        let txn = Txn::new()
            .when([
                Compare::version(self.keys.primary(base), CompareOp::Equal, 0),
                Compare::mod_revision(self.keys.record(base), CompareOp::Equal, record_rev),
            ])
            .and_then(self.take_ops(base, rec, lease));
        Ok(client
            .txn(txn)
            .await
            .map_err(|e| e.to_string())?
            .succeeded())
    }

    fn took(&self, v: &Unit, rec: RecordEntry) {
        let epoch = rec.epoch;
        self.published
            .lock()
            .expect("poisoned")
            .insert(v.name.clone(), rec);
        v.hold(epoch);
        v.published();
    }

    /// Publishes this primary's generation and sync mirrors in the record
    /// if they changed (`force`: even if not), guarded by holding the key.
    async fn publish(&self, client: &mut Client, v: &Unit, force: bool) -> Result<(), String> {
        let _one = self.publishing.lock().await;
        self.publish_without(client, v, force, &[]).await
    }

    /// [`Agent::publish`], leaving the mirrors `exclude` out of the sync
    /// mirrors in step.
    async fn publish_without(
        &self,
        client: &mut Client,
        v: &Unit,
        force: bool,
        exclude: &[String],
    ) -> Result<(), String> {
        let name = v.name.as_str();
        let epoch = v.holds().max(v.epoch());
        let gen = v.generation();
        let rec = RecordEntry {
            v: FORMAT,
            epoch,
            primary: self.node.clone(),
            generation: gen_hex(gen),
            sync_mirrors: v
                .in_step()
                .into_iter()
                .filter(|n| !exclude.contains(n))
                .collect(),
            volumes: v.volume_generations(),
            // The epoch's starting point stays as it was taken.
            parents: self
                .published
                .lock()
                .expect("poisoned")
                .get(name)
                .filter(|r| r.epoch == epoch)
                .map(|r| r.parents.clone())
                .unwrap_or_default(),
        };
        if !force && self.published.lock().expect("poisoned").get(name) == Some(&rec) {
            return Ok(());
        }
        let key = KeyEntry {
            v: FORMAT,
            node: self.node.clone(),
            epoch,
        };
        let txn = Txn::new()
            .when([Compare::value(
                self.keys.primary(&v.base),
                CompareOp::Equal,
                encode(&key),
            )])
            .and_then([TxnOp::put(self.keys.record(&v.base), encode(&rec), None)]);
        let ok = tokio::time::timeout(request_timeout(self.cfg.lease_ttl), client.txn(txn))
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| e.to_string())?
            .succeeded();
        if !ok {
            return Err(format!("{name}: not the holder of epoch {epoch} any more"));
        }
        debug!(volume = name, generation = %rec.generation, sync = ?rec.sync_mirrors, "record published");
        self.published
            .lock()
            .expect("poisoned")
            .insert(name.to_owned(), rec);
        let _ = gen;
        v.published();
        Ok(())
    }

    /// What this node says of its copy of `v` while it is a mirror.
    fn local_report(&self, v: &Unit) -> Option<decide::MirrorReport> {
        v.report(&self.node)
    }

    async fn put_report(
        &self,
        client: &mut Client,
        name: &str,
        base: &str,
        m: &decide::MirrorReport,
        lease: i64,
    ) -> Result<(), String> {
        let entry = ReportEntry {
            v: FORMAT,
            generation: gen_hex(m.generation),
            data: records::data_str(m.data).into(),
        };
        if self.reported.lock().expect("poisoned").get(name) == Some(&(lease, entry.clone())) {
            return Ok(());
        }
        client
            .put(
                self.keys.report(base, &self.node),
                encode(&entry),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await
            .map_err(|e| e.to_string())?;
        self.reported
            .lock()
            .expect("poisoned")
            .insert(name.to_owned(), (lease, entry));
        Ok(())
    }

    /// Before mirrors of `volume` switch to async: the record stops listing
    /// them as sync mirrors in step, so none of them is taken as holding
    /// every acknowledged write once it may lag. Err: the switch must not
    /// happen (this node does not hold the key, or etcd is unreachable).
    pub async fn switch_to_async(
        &self,
        volume: &str,
        nodes: &[String],
        switch: impl FnOnce(),
    ) -> Result<(), String> {
        let _one = self.publishing.lock().await;
        let Some(v) = self.unit_of(volume) else {
            return Err(format!("{volume}: not a cluster volume"));
        };
        if v.holds() != 0 {
            let Some((_, mut client)) = self.etcd.get().await else {
                return Err("no etcd member answers".into());
            };
            self.publish_without(&mut client, &v, true, nodes).await?;
        }
        // (Not the primary here: nothing is acknowledged under this node.)
        switch();
        Ok(())
    }

    /// Publishes a new generation of `volume` before any write under it is
    /// acknowledged (called by the write path through
    /// [`crate::primary::GenState`]).
    pub async fn publish_now(&self, volume: &str) -> Result<(), String> {
        let Some(v) = self.unit_of(volume) else {
            return Err(format!("{volume}: not a cluster volume"));
        };
        let Some((at, mut client)) = self.etcd.get().await else {
            return Err("no etcd member answers".into());
        };
        let r = self.publish(&mut client, &v, true).await;
        if r.is_err() {
            self.etcd.failed(at);
        }
        r
    }
}

/// A node stepping down undoes the generations it started after `parent`
/// (the one the new primary took over from) and never published: no write
/// was acknowledged under them (every acknowledgement waits for the
/// publish), and the regions written under them are still marked in its
/// links' bitmaps, which it reports to the new primary, which copies them
/// over. Without this the new primary would see a split brain.
async fn roll_back(m: &ClusterVolume, parent: u64) {
    let name = m.volume.name().to_owned();
    let cell = m.volume.meta_cell().clone();
    let before = m.volume.meta().generations;
    if before.current == parent || !before.history.contains(&parent) {
        return;
    }
    let done = tokio::task::spawn_blocking(move || {
        cell.update(|meta| {
            while meta.generations.current != parent && meta.generations.unrotate() {}
            meta.primary_at = meta.generations.current;
        })
    })
    .await;
    match done {
        Ok(Ok(after)) => warn!(volume = %name, undone = %before.to_display(),
            now = %after.generations.to_display(),
            "stepping down: generations started here after the new primary's starting point \
             were never published (no write under them was acknowledged); undone, and the \
             regions written under them are reported to the new primary to copy over"),
        Ok(Err(e)) => warn!(volume = %name, error = %e, "undoing unpublished generations failed"),
        Err(e) => warn!(volume = %name, error = %e, "undoing unpublished generations failed"),
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

/// Registers cluster mode's families: the lease, the epoch each volume is
/// known at here and whether this node holds it, and the counters.
pub fn register_metrics(registry: &mut crate::daemon::metrics::Registry, agent: Arc<Agent>) {
    use crate::daemon::metrics::{self as m, MetricType};
    registry.register_collector(m::FnCollector::boxed("cluster", move |enc| {
        let s = agent.status();
        let mut f = m::family(
            enc,
            "blockmirror_cluster_lease_ok",
            MetricType::Gauge,
            "1 while this node's etcd lease is trusted (a primary acknowledges writes only then).",
        )?;
        f.sample(&[], u64::from(s.lease_ok))?;
        let mut f = m::family(
            enc,
            "blockmirror_cluster_etcd_connected",
            MetricType::Gauge,
            "1 while the last etcd request of the lease keeper succeeded.",
        )?;
        f.sample(&[], u64::from(s.etcd_connected))?;
        let mut f = m::family(
            enc,
            "blockmirror_volume_epoch",
            MetricType::Gauge,
            "The volume's fencing epoch as known here: held as primary, or the newest seen as a mirror.",
        )?;
        let volumes = agent.volumes();
        for v in &volumes {
            f.sample(&[("volume", v.volume.name())], v.fence.epoch())?;
        }
        let mut f = m::family(
            enc,
            "blockmirror_volume_epoch_held",
            MetricType::Gauge,
            "1 while this node holds the volume's primary key.",
        )?;
        for v in &volumes {
            f.sample(&[("volume", v.volume.name())], u64::from(v.fence.holds() != 0))?;
        }
        for (name, help, value) in [
            (
                "blockmirror_cluster_promotions_total",
                "Automatic promotions made by this node.",
                s.promotions,
            ),
            (
                "blockmirror_cluster_lossy_promotions_total",
                "Automatic promotions of a mirror that may have lacked the last writes (auto_promote = \"any\"): data windows given up.",
                s.lossy_promotions,
            ),
            (
                "blockmirror_cluster_step_downs_total",
                "Times this node demoted a volume because another node held a newer epoch.",
                s.step_downs,
            ),
            (
                "blockmirror_cluster_lease_losses_total",
                "Times this node's lease was not renewed in time.",
                s.lease_losses,
            ),
        ] {
            let mut f = m::family(enc, name, MetricType::Counter, help)?;
            f.sample(&[], value)?;
        }
        Ok(())
    }));
}

/// What fails over as one: a volume, or the volumes of a consistency group
/// on this node. A group is one key, one epoch and one record in etcd: its
/// generation is a digest of every member's, so a mirror is "in step" only
/// if it is in step on every volume of the group, and the decisions of
/// `blockmirror_core::cluster` apply to it unchanged.
pub struct Unit {
    /// For logs and the agent's caches: the volume, or `group:NAME`.
    pub name: String,
    /// Its keys' folder under the prefix: `volumes/NAME` or `groups/NAME`.
    pub base: String,
    pub members: Vec<Arc<ClusterVolume>>,
}

impl Unit {
    fn all(volumes: &[Arc<ClusterVolume>]) -> Vec<Unit> {
        let mut units: Vec<Unit> = Vec::new();
        for v in volumes {
            match &v.group {
                None => units.push(Unit {
                    name: v.volume.name().to_owned(),
                    base: format!("volumes/{}", v.volume.name()),
                    members: vec![v.clone()],
                }),
                Some(g) => {
                    let base = format!("groups/{g}");
                    match units.iter_mut().find(|u| u.base == base) {
                        Some(u) => u.members.push(v.clone()),
                        None => units.push(Unit {
                            name: format!("group:{g}"),
                            base,
                            members: vec![v.clone()],
                        }),
                    }
                }
            }
        }
        units
    }

    fn volume_generations(&self) -> std::collections::BTreeMap<String, String> {
        self.members
            .iter()
            .map(|m| {
                (
                    m.volume.name().to_owned(),
                    gen_hex(m.volume.meta().generations.current),
                )
            })
            .collect()
    }

    fn volume_names(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| m.volume.name().to_owned())
            .collect()
    }

    /// Primary here if any member is (a group half promoted steps down, or
    /// takes the key, as a whole).
    fn primary_here(&self) -> bool {
        self.members
            .iter()
            .any(|m| m.volume.role() == Role::Primary)
    }

    /// The generation the unit publishes and is judged by: the volume's, or
    /// for a group a digest of every member's (0 while any member is blank).
    fn generation(&self) -> u64 {
        if let [one] = self.members.as_slice() {
            return one.volume.meta().generations.current;
        }
        let mut gens: Vec<(String, u64)> = self
            .members
            .iter()
            .map(|m| {
                (
                    m.volume.name().to_owned(),
                    m.volume.meta().generations.current,
                )
            })
            .collect();
        if gens.iter().any(|(_, g)| *g == 0) {
            return 0;
        }
        gens.sort();
        let mut h = blake3::Hasher::new();
        for (n, g) in &gens {
            h.update(n.as_bytes());
            h.update(&[0]);
            h.update(&g.to_be_bytes());
        }
        u64::from_be_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes")).max(1)
    }

    fn report(&self, node: &str) -> Option<decide::MirrorReport> {
        if self.primary_here() {
            return None;
        }
        let worst = self
            .members
            .iter()
            .map(|m| m.volume.meta().label.view())
            .max_by_key(|d| match d {
                DataState::InSync => 0,
                DataState::Consistent => 1,
                DataState::Inconsistent => 2,
            })
            .unwrap_or(DataState::Inconsistent);
        Some(decide::MirrorReport {
            node: node.to_owned(),
            generation: self.generation(),
            data: worst,
        })
    }

    /// The sync mirrors live and in step on every member, by node name.
    fn in_step(&self) -> Vec<String> {
        let mut common: Option<Vec<String>> = None;
        for m in &self.members {
            let mut n: Vec<String> = match m.volume.replicator() {
                None => Vec::new(),
                Some(r) => r
                    .links
                    .iter()
                    .map(|l| l.snapshot())
                    .filter(|s| {
                        s.mode == MirrorMode::Sync
                            && s.state == crate::primary::link::SyncState::InSync
                            && s.connection == crate::primary::link::Connection::Connected
                    })
                    .filter_map(|s| s.peer_node)
                    .collect(),
            };
            n.sort();
            common = Some(match common {
                None => n,
                Some(c) => c.into_iter().filter(|x| n.contains(x)).collect(),
            });
        }
        common.unwrap_or_default()
    }

    fn raise(&self, epoch: u64) {
        for m in &self.members {
            if m.fence.raise(epoch) {
                if let Some(t) = &m.target {
                    t.epoch_raised(epoch);
                }
            }
        }
    }

    fn hold(&self, epoch: u64) {
        for m in &self.members {
            m.fence.hold(epoch);
        }
    }

    fn release(&self) {
        for m in &self.members {
            m.fence.release();
        }
    }

    fn holds(&self) -> u64 {
        self.members
            .iter()
            .map(|m| m.fence.holds())
            .min()
            .unwrap_or(0)
    }

    fn epoch(&self) -> u64 {
        self.members
            .iter()
            .map(|m| m.fence.epoch())
            .max()
            .unwrap_or(0)
    }

    fn mark_synced(&self) {
        for m in &self.members {
            m.fence.mark_synced();
        }
    }

    /// The coordinator holds every member's current generation now.
    fn published(&self) {
        for m in &self.members {
            if let Some(r) = m.volume.replicator() {
                r.gen.published(m.volume.meta().generations.current);
            }
        }
    }
}

/// The etcd members, one client each, and the one in use. A request that
/// fails moves to the next member: a balanced channel over all of them
/// kept sending some requests (and a lease's keep-alive stream) to a dead
/// member, and lost the lease with two members of three alive.
struct Endpoints {
    urls: Vec<String>,
    clients: tokio::sync::Mutex<Vec<Option<Client>>>,
    current: std::sync::atomic::AtomicUsize,
    timeout: Duration,
}

impl Endpoints {
    fn new(urls: &[String], timeout: Duration) -> Self {
        Self {
            urls: urls.to_vec(),
            clients: tokio::sync::Mutex::new(vec![None; urls.len()]),
            current: std::sync::atomic::AtomicUsize::new(0),
            timeout,
        }
    }

    /// The member in use (connecting on first use), or the next that
    /// connects; None if none does.
    async fn get(&self) -> Option<(usize, Client)> {
        let n = self.urls.len();
        let start = self.current.load(Ordering::SeqCst);
        for k in 0..n {
            let i = (start + k) % n;
            if let Some(c) = self.clients.lock().await[i].clone() {
                if k > 0 {
                    self.current.store(i, Ordering::SeqCst);
                }
                return Some((i, c));
            }
            let opts = ConnectOptions::new()
                .with_connect_timeout(self.timeout)
                .with_timeout(self.timeout)
                .with_require_leader(true)
                .with_keep_alive(Duration::from_secs(1), self.timeout);
            match tokio::time::timeout(
                self.timeout * 2,
                Client::connect([&self.urls[i]], Some(opts)),
            )
            .await
            {
                Ok(Ok(c)) => {
                    info!(endpoint = %self.urls[i], "connected to etcd");
                    self.clients.lock().await[i] = Some(c.clone());
                    self.current.store(i, Ordering::SeqCst);
                    return Some((i, c));
                }
                Ok(Err(e)) => {
                    debug!(endpoint = %self.urls[i], error = %e, "cannot reach etcd member")
                }
                Err(_) => debug!(endpoint = %self.urls[i], "etcd member does not answer"),
            }
        }
        None
    }

    /// A request to member `i` failed: the next request goes to the next.
    fn failed(&self, i: usize) {
        let n = self.urls.len();
        let _ = self
            .current
            .compare_exchange(i, (i + 1) % n, Ordering::SeqCst, Ordering::SeqCst);
    }
}
