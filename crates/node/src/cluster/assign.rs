//! Volumes declared in etcd (`blockmirror cluster apply`): the node opens
//! and serves every one that names it, as soon as the addresses of the
//! volume's other nodes are known. A volume, or a consistency group's
//! volumes together, open as one; a declaration that changes or goes away
//! while the volume is served is logged, and takes effect when the node
//! restarts (a served volume is never closed under its hosts).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, GetOptions};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::records::{decode, NodeEntry};
use super::spec::VolumeSpec;
use super::{request_timeout, Agent, Host};

/// How often the declarations are read again without a watch event (a
/// peer registering its address is not watched).
const REREAD: Duration = Duration::from_secs(1);
/// A unit whose opening failed (its port taken, its disk full) is tried
/// again after this long, not at every read.
const RETRY_FAILED: Duration = Duration::from_secs(10);

/// What the loop has said about each volume, so that a state is logged once.
#[derive(Default)]
struct Said {
    last: HashMap<String, String>,
    /// Units whose opening failed, and when.
    failed: HashMap<String, std::time::Instant>,
}

impl Said {
    fn warn(&mut self, volume: &str, msg: String) {
        if self.last.get(volume) != Some(&msg) {
            warn!(volume, "{msg}");
            self.last.insert(volume.to_owned(), msg);
        }
    }

    fn forget(&mut self, volume: &str) {
        self.last.remove(volume);
    }
}

impl Agent {
    /// Runs until `shutdown`: opens the volumes etcd declares for this node.
    pub(super) async fn assign_loop(&self, shutdown: CancellationToken) {
        let mut watch = super::PrefixWatch::default();
        let mut said = Said::default();
        // The declaration each volume was opened with.
        let mut opened: HashMap<String, VolumeSpec> = HashMap::new();
        loop {
            let Some(host) = self.host.get().and_then(|h| h.upgrade()) else {
                return;
            };
            let Some((at, mut client)) = self.client(&shutdown).await else {
                return;
            };
            watch
                .ensure(&mut client, self.keys.specs(), self.cfg.lease_ttl)
                .await;
            if let Err(e) = self
                .assign_once(&mut client, host, &mut said, &mut opened)
                .await
            {
                self.etcd.failed(at);
                debug!(error = %e, "reading the declared volumes failed; retrying");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = watch.changed() => {}
                _ = tokio::time::sleep(REREAD) => {}
            }
        }
    }

    async fn assign_once(
        &self,
        client: &mut Client,
        host: Arc<dyn Host>,
        said: &mut Said,
        opened: &mut HashMap<String, VolumeSpec>,
    ) -> Result<(), String> {
        let timeout = request_timeout(self.cfg.lease_ttl);
        let get = |key: String| {
            let mut c = client.clone();
            async move {
                tokio::time::timeout(timeout, c.get(key, Some(GetOptions::new().with_prefix())))
                    .await
                    .map_err(|_| "etcd did not answer in time".to_string())?
                    .map_err(|e| e.to_string())
            }
        };
        let specs = get(self.keys.specs()).await?;
        let members = get(self.keys.members()).await?;
        let mut addrs: HashMap<String, String> = HashMap::new();
        for kv in members.kvs() {
            let Some(node) = kv
                .key_str()
                .ok()
                .and_then(|k| k.strip_prefix(&self.keys.members()))
            else {
                continue;
            };
            if let Ok(NodeEntry {
                listen: Some(l), ..
            }) = decode::<NodeEntry>(kv.value())
            {
                addrs.insert(node.to_owned(), l);
            }
        }
        let mut declared: Vec<VolumeSpec> = Vec::new();
        for kv in specs.kvs() {
            let key = kv.key_str().unwrap_or("?").to_owned();
            match decode::<VolumeSpec>(kv.value()) {
                Ok(s) => declared.push(s),
                Err(e) => said.warn(&key, format!("declaration {key} unreadable: {e}")),
            }
        }
        let served = host.served();
        let served_names: HashSet<&str> = served.iter().map(|(n, _)| n.as_str()).collect();
        let served_groups: HashSet<&str> =
            served.iter().filter_map(|(_, g)| g.as_deref()).collect();
        // What opens together: a volume, or a group's volumes here.
        let mut units: BTreeMap<String, Result<Vec<(String, String)>, String>> = BTreeMap::new();
        for spec in declared.iter().filter(|s| s.involves(&self.node)) {
            let name = spec.name.as_str();
            if served_names.contains(name) {
                match opened.get(name) {
                    Some(was) if was != spec => said.warn(
                        name,
                        "its declaration in etcd changed; the change takes effect when this node \
                         restarts"
                            .into(),
                    ),
                    Some(_) => said.forget(name),
                    None => said.warn(
                        name,
                        "declared in etcd and in this node's config file: the config file's \
                         table is served"
                            .into(),
                    ),
                }
                continue;
            }
            let unit = match &spec.consistency_group {
                Some(g) if served_groups.contains(g.as_str()) => {
                    said.warn(
                        name,
                        format!(
                            "its consistency group {g:?} already runs here; the volume joins it \
                             when this node restarts"
                        ),
                    );
                    continue;
                }
                Some(g) => format!("group:{g}"),
                None => name.to_owned(),
            };
            let peer = |n: &str| addrs.get(n).cloned();
            let table =
                spec.volume_table(&self.node, &peer, &self.cfg.volume_dir, self.cfg.nbd_host);
            let entry = units.entry(unit).or_insert_with(|| Ok(Vec::new()));
            match (entry.as_mut(), table) {
                (Ok(tables), Ok(t)) => tables.push((name.to_owned(), t)),
                (Ok(_), Err(e)) => *entry = Err(format!("{name}: {e}")),
                (Err(_), _) => {}
            }
        }
        for (name, _) in opened.iter() {
            if !declared.iter().any(|s| &s.name == name) {
                said.warn(
                    name,
                    "no longer declared in etcd; still served until this node restarts (its \
                     image and state stay where they are)"
                        .into(),
                );
            }
        }
        for (unit, tables) in units {
            if said
                .failed
                .get(&unit)
                .is_some_and(|t| t.elapsed() < RETRY_FAILED)
            {
                continue;
            }
            let tables = match tables {
                Ok(t) => t,
                Err(e) => {
                    said.warn(&unit, format!("not served yet: {e}"));
                    continue;
                }
            };
            match host.clone().open(tables).await {
                Ok(names) => {
                    said.forget(&unit);
                    said.failed.remove(&unit);
                    info!(unit, volumes = ?names, "serving volumes declared in etcd");
                    for n in names {
                        if let Some(s) = declared.iter().find(|s| s.name == n) {
                            opened.insert(n, s.clone());
                        }
                    }
                }
                Err(e) => {
                    said.failed.insert(unit.clone(), std::time::Instant::now());
                    said.warn(
                        &unit,
                        format!("opening it failed (tried again in {RETRY_FAILED:?}): {e}"),
                    );
                }
            }
        }
        Ok(())
    }
}
