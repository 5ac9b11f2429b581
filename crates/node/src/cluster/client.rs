//! What the `blockmirror cluster` commands ask of etcd: the cluster's
//! picture (`status`), declaring volumes (`apply`), and its changes as they
//! happen (`events`). A node's agent never calls these.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Txn, TxnOp, WatchOptions,
};
use serde::Serialize;

use super::records::{decode, encode, KeyEntry, Keys, NodeEntry, RecordEntry, ReportEntry};
use super::spec::{self, VolumeSpec};

async fn connect(endpoints: &[String]) -> Result<Client, String> {
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(3));
    Client::connect(endpoints, Some(opts))
        .await
        .map_err(|e| format!("etcd {endpoints:?}: {e}"))
}

/// One volume as `blockmirror cluster status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VolumeView {
    pub volume: String,
    /// The node holding the primary key now (None: nobody: failover pending
    /// or impossible by policy).
    pub primary: Option<String>,
    /// The record's epoch and the node that took it.
    pub epoch: u64,
    pub recorded_primary: String,
    pub generation: String,
    pub sync_mirrors: Vec<String>,
    /// Live mirrors' reports: node -> (generation, data).
    pub mirrors: Vec<MirrorView>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct MirrorView {
    pub node: String,
    pub generation: String,
    pub data: String,
}

/// One registered (live) node.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeView {
    pub node: String,
    pub site: String,
    pub admin: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ClusterView {
    pub nodes: Vec<NodeView>,
    pub volumes: Vec<VolumeView>,
    /// Volumes declared by `blockmirror cluster apply`.
    pub declared: Vec<VolumeSpec>,
}

/// Reads every node and volume of the deployment under `prefix`.
pub async fn read_view(endpoints: &[String], prefix: &str) -> Result<ClusterView, String> {
    let mut c = connect(endpoints).await?;
    let keys = Keys {
        prefix: prefix.to_owned(),
    };
    let got = c
        .get(format!("{prefix}/"), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|e| e.to_string())?;
    let mut nodes = Vec::new();
    let mut vols: std::collections::BTreeMap<String, VolumeView> = Default::default();
    let vol = |vols: &mut std::collections::BTreeMap<String, VolumeView>, name: &str| {
        vols.entry(name.to_owned())
            .or_insert_with(|| VolumeView {
                volume: name.to_owned(),
                primary: None,
                epoch: 0,
                recorded_primary: String::new(),
                generation: String::new(),
                sync_mirrors: Vec::new(),
                mirrors: Vec::new(),
            })
            .volume
            .clone()
    };
    let mut declared = Vec::new();
    for kv in got.kvs() {
        let Ok(k) = kv.key_str() else { continue };
        if k.starts_with(&keys.specs()) {
            if let Ok(s) = decode::<VolumeSpec>(kv.value()) {
                declared.push(s);
            }
            continue;
        }
        if let Some(node) = k.strip_prefix(&keys.nodes()) {
            if let Ok(e) = decode::<NodeEntry>(kv.value()) {
                nodes.push(NodeView {
                    node: node.to_owned(),
                    site: e.site,
                    admin: e.admin,
                });
            }
            continue;
        }
        let Some((name, rest)) = keys.split_unit_key(k) else {
            continue;
        };
        vol(&mut vols, &name);
        let v = vols.get_mut(&name).expect("just made");
        match rest.as_str() {
            "record" => {
                if let Ok(r) = decode::<RecordEntry>(kv.value()) {
                    v.epoch = r.epoch;
                    v.recorded_primary = r.primary;
                    v.generation = r.generation;
                    v.sync_mirrors = r.sync_mirrors;
                }
            }
            "primary" => {
                if let Ok(e) = decode::<KeyEntry>(kv.value()) {
                    v.primary = Some(e.node);
                }
            }
            other => {
                if let (Some(node), Ok(r)) = (
                    other.strip_prefix("mirrors/"),
                    decode::<ReportEntry>(kv.value()),
                ) {
                    v.mirrors.push(MirrorView {
                        node: node.to_owned(),
                        generation: r.generation,
                        data: r.data,
                    });
                }
            }
        }
    }
    Ok(ClusterView {
        nodes,
        volumes: vols.into_values().collect(),
        declared,
    })
}

/// What `cluster apply` did (or, with `dry_run`, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ApplyReport {
    pub added: Vec<String>,
    /// Declared before and changed: served with the new declaration once
    /// their nodes restart.
    pub changed: Vec<String>,
    pub unchanged: Vec<String>,
    /// Declared in etcd and not in the file: deleted with `prune`, else
    /// left. Their nodes serve them until they restart.
    pub absent: Vec<String>,
    pub pruned: bool,
    pub dry_run: bool,
    /// Every volume of the file as stored (its NBD port given).
    pub volumes: Vec<VolumeSpec>,
}

/// `blockmirror cluster apply`: stores the file's declarations under
/// `<prefix>/spec/` in one transaction that fails if any declaration changed
/// since it was read (two applies at once: one wins, the other is told).
/// A declared volume's size and consistency group cannot change.
pub async fn apply(
    endpoints: &[String],
    prefix: &str,
    text: &str,
    prune: bool,
    dry_run: bool,
) -> Result<ApplyReport, String> {
    let mut decl = spec::parse_file(text)?;
    let keys = Keys {
        prefix: prefix.to_owned(),
    };
    let mut c = connect(endpoints).await?;
    let got = c
        .get(keys.specs(), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|e| e.to_string())?;
    let mut stored: BTreeMap<String, (VolumeSpec, i64)> = BTreeMap::new();
    for kv in got.kvs() {
        let key = kv.key_str().unwrap_or("?");
        let s: VolumeSpec =
            decode(kv.value()).map_err(|e| format!("the declaration at {key}: {e}"))?;
        stored.insert(s.name.clone(), (s, kv.mod_revision()));
    }
    let before: Vec<VolumeSpec> = stored.values().map(|(s, _)| s.clone()).collect();
    spec::assign_ports(&mut decl, &before)?;
    spec::check_on_nodes(&decl)?;
    let mut report = ApplyReport {
        pruned: prune,
        dry_run,
        ..ApplyReport::default()
    };
    let mut compares = Vec::new();
    let mut ops = Vec::new();
    for v in &decl.volumes {
        let key = keys.spec(&v.name);
        match stored.get(&v.name) {
            None => {
                compares.push(Compare::create_revision(key.clone(), CompareOp::Equal, 0));
                ops.push(TxnOp::put(key, encode(v), None));
                report.added.push(v.name.clone());
            }
            Some((old, rev)) => {
                if old.size != v.size {
                    return Err(format!(
                        "volume {:?}: its size is {} bytes in etcd; a declared volume is not \
                         resized (declare a new one)",
                        v.name, old.size
                    ));
                }
                if old.consistency_group != v.consistency_group {
                    return Err(format!(
                        "volume {:?}: its consistency group cannot change ({:?} in etcd)",
                        v.name, old.consistency_group
                    ));
                }
                compares.push(Compare::mod_revision(key.clone(), CompareOp::Equal, *rev));
                if old == v {
                    report.unchanged.push(v.name.clone());
                } else {
                    ops.push(TxnOp::put(key, encode(v), None));
                    report.changed.push(v.name.clone());
                }
            }
        }
    }
    for (name, (_, rev)) in &stored {
        if decl.volumes.iter().any(|v| &v.name == name) {
            continue;
        }
        report.absent.push(name.clone());
        if prune {
            let key = keys.spec(name);
            compares.push(Compare::mod_revision(key.clone(), CompareOp::Equal, *rev));
            ops.push(TxnOp::delete(key, None));
        }
    }
    report.volumes = decl.volumes;
    if dry_run || ops.is_empty() {
        return Ok(report);
    }
    let done = c
        .txn(Txn::new().when(compares).and_then(ops))
        .await
        .map_err(|e| e.to_string())?;
    if !done.succeeded() {
        return Err(
            "the declarations in etcd changed while this apply ran (another apply?); nothing \
             was written: run it again"
                .into(),
        );
    }
    Ok(report)
}

/// One change in etcd, as `cluster events` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterEvent {
    /// RFC 3339, when this command saw it.
    pub time: String,
    /// `node_up`, `node_down`, `address`, `primary`, `primary_released`,
    /// `record`, `mirror_report`, `mirror_gone`, `declared`, `undeclared`,
    /// or `other`.
    pub kind: String,
    /// The volume, or `group:NAME`, where it concerns one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// One line for a person.
    pub text: String,
    pub revision: i64,
}

/// Reads one watched change as an event.
pub fn interpret(
    keys: &Keys,
    put: bool,
    key: &str,
    value: &[u8],
    prev: Option<&[u8]>,
    revision: i64,
) -> ClusterEvent {
    let ev =
        |kind: &str, volume: Option<String>, node: Option<String>, text: String| ClusterEvent {
            time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            kind: kind.into(),
            volume,
            node,
            text,
            revision,
        };
    if let Some(node) = key.strip_prefix(&keys.nodes()) {
        let n = Some(node.to_owned());
        return match (put, decode::<NodeEntry>(value)) {
            (true, Ok(e)) => ev(
                "node_up",
                None,
                n,
                format!("node {node} is up (site {}, admin {})", e.site, e.admin),
            ),
            (true, Err(e)) => ev("other", None, n, format!("node {node}: unreadable: {e}")),
            (false, _) => ev(
                "node_down",
                None,
                n,
                format!("node {node} is gone (its lease lapsed or was revoked)"),
            ),
        };
    }
    if let Some(node) = key.strip_prefix(&keys.members()) {
        let addr = decode::<NodeEntry>(value)
            .ok()
            .and_then(|e| e.listen)
            .unwrap_or_else(|| "-".into());
        return ev(
            "address",
            None,
            Some(node.to_owned()),
            format!("node {node} replicates at {addr}"),
        );
    }
    if let Some(name) = key.strip_prefix(&keys.specs()) {
        let v = Some(name.to_owned());
        return match (put, decode::<VolumeSpec>(value)) {
            (true, Ok(s)) => ev(
                "declared",
                v,
                None,
                format!(
                    "{name}: declared, {} bytes, nodes {}, NBD port {}",
                    s.size,
                    s.nodes().collect::<Vec<_>>().join(","),
                    s.nbd_port
                ),
            ),
            (true, Err(e)) => ev(
                "other",
                v,
                None,
                format!("{name}: unreadable declaration: {e}"),
            ),
            (false, _) => ev(
                "undeclared",
                v,
                None,
                format!("{name}: declaration removed"),
            ),
        };
    }
    let Some((unit, rest)) = keys.split_unit_key(key) else {
        return ev(
            "other",
            None,
            None,
            format!("{key} {}", if put { "set" } else { "deleted" }),
        );
    };
    let v = Some(unit.clone());
    match (rest.as_str(), put) {
        ("primary", true) => match decode::<KeyEntry>(value) {
            Ok(e) => ev(
                "primary",
                v,
                Some(e.node.clone()),
                format!("{unit}: {} is primary at epoch {}", e.node, e.epoch),
            ),
            Err(e) => ev(
                "other",
                v,
                None,
                format!("{unit}: unreadable primary key: {e}"),
            ),
        },
        ("primary", false) => {
            let was = prev.and_then(|p| decode::<KeyEntry>(p).ok());
            let (node, text) = match was {
                Some(e) => (
                    Some(e.node.clone()),
                    format!(
                        "{unit}: primary key of {} (epoch {}) released: its lease lapsed or it \
                         stepped down",
                        e.node, e.epoch
                    ),
                ),
                None => (None, format!("{unit}: primary key released")),
            };
            ev("primary_released", v, node, text)
        }
        ("record", true) => match decode::<RecordEntry>(value) {
            Ok(r) => ev(
                "record",
                v,
                Some(r.primary.clone()),
                format!(
                    "{unit}: record epoch {} primary {} generation {} in step [{}]",
                    r.epoch,
                    r.primary,
                    r.generation,
                    r.sync_mirrors.join(",")
                ),
            ),
            Err(e) => ev("other", v, None, format!("{unit}: unreadable record: {e}")),
        },
        (m, true) if m.starts_with("mirrors/") => {
            let node = &m["mirrors/".len()..];
            match decode::<ReportEntry>(value) {
                Ok(r) => ev(
                    "mirror_report",
                    v,
                    Some(node.to_owned()),
                    format!(
                        "{unit}: mirror {node} at generation {} ({})",
                        r.generation, r.data
                    ),
                ),
                Err(e) => ev("other", v, None, format!("{unit}: unreadable report: {e}")),
            }
        }
        (m, false) if m.starts_with("mirrors/") => {
            let node = &m["mirrors/".len()..];
            ev(
                "mirror_gone",
                v,
                Some(node.to_owned()),
                format!("{unit}: mirror {node} stopped reporting"),
            )
        }
        (other, put) => ev(
            "other",
            v,
            None,
            format!("{unit}: {other} {}", if put { "set" } else { "deleted" }),
        ),
    }
}

/// `blockmirror cluster events`: every change under `prefix` from now on,
/// handed to `each` until it returns false or the watch ends; `ready` is
/// called with etcd's revision once the watch is in place.
pub async fn watch_events(
    endpoints: &[String],
    prefix: &str,
    ready: impl FnOnce(i64),
    mut each: impl FnMut(ClusterEvent) -> bool,
) -> Result<(), String> {
    let mut ready = Some(ready);
    let keys = Keys {
        prefix: prefix.to_owned(),
    };
    let mut c = connect(endpoints).await?;
    let mut stream = c
        .watch(
            format!("{prefix}/"),
            Some(WatchOptions::new().with_prefix().with_prev_key()),
        )
        .await
        .map_err(|e| e.to_string())?;
    while let Some(resp) = stream.message().await.map_err(|e| e.to_string())? {
        if resp.created() {
            if let Some(r) = ready.take() {
                r(resp.header().map_or(0, |h| h.revision()));
            }
        }
        for e in resp.events() {
            let Some(kv) = e.kv() else { continue };
            let Ok(key) = kv.key_str() else { continue };
            let put = e.event_type() == EventType::Put;
            let ev = interpret(
                &keys,
                put,
                key,
                kv.value(),
                e.prev_kv().map(|p| p.value()),
                kv.mod_revision(),
            );
            if !each(ev) {
                return Ok(());
            }
        }
    }
    Err("the etcd watch ended".into())
}

#[cfg(test)]
mod tests {
    use super::super::records::FORMAT;
    use super::*;

    #[test]
    fn watched_changes_read_as_events() {
        let keys = Keys {
            prefix: "/bm".into(),
        };
        let key = |node: &str, epoch| {
            encode(&KeyEntry {
                v: FORMAT,
                node: node.into(),
                epoch,
            })
        };
        let e = interpret(&keys, true, "/bm/volumes/db/primary", &key("b", 3), None, 7);
        assert_eq!(
            (e.kind.as_str(), e.volume.as_deref(), e.node.as_deref()),
            ("primary", Some("db"), Some("b"))
        );
        assert!(e.text.contains("b is primary at epoch 3"), "{}", e.text);
        let e = interpret(
            &keys,
            false,
            "/bm/groups/app/primary",
            b"",
            Some(&key("a", 2)),
            8,
        );
        assert_eq!(e.kind, "primary_released");
        assert_eq!(e.volume.as_deref(), Some("group:app"));
        assert!(e.text.contains("of a (epoch 2) released"), "{}", e.text);
        let e = interpret(&keys, false, "/bm/nodes/c", b"", None, 9);
        assert_eq!(
            (e.kind.as_str(), e.node.as_deref()),
            ("node_down", Some("c"))
        );
        let e = interpret(&keys, true, "/bm/nodes/c", b"{not json", None, 9);
        assert_eq!(e.kind, "other");
        let e = interpret(&keys, false, "/bm/volumes/db/mirrors/c", b"", None, 10);
        assert_eq!(e.kind, "mirror_gone");
        let e = interpret(&keys, false, "/bm/spec/db", b"", None, 11);
        assert_eq!(e.kind, "undeclared");
    }
}
