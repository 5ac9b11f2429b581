//! The `GET /status` model (see CONTRACT.md) and its table for
//! `blockmirror status`.
//!
//! Field names are part of the operator interface: add fields, never rename.
//! Deserialisation ignores unknown fields and defaults missing optional ones,
//! so an older CLI can read a newer node and the other way round.

use serde::{Deserialize, Serialize};

/// Everything `GET /status` returns.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node's name from its config.
    pub node: String,
    pub volumes: Vec<VolumeStatus>,
    /// Cluster mode (`[cluster]`): the node's link to etcd and its lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterStatus>,
}

/// The node-wide cluster state in /status.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub etcd_connected: bool,
    /// The lease is trusted now (a primary acknowledges writes only then).
    pub lease_ok: bool,
    pub site: String,
    pub auto_promote: String,
    pub lease_ttl_ms: u64,
    pub lease_remaining_ms: u64,
    /// Automatic promotions made here, lossy ones among them, step-downs
    /// for a newer epoch, and lease losses.
    pub promotions: u64,
    pub lossy_promotions: u64,
    pub step_downs: u64,
    pub lease_losses: u64,
}

/// One volume.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub name: String,
    /// `primary` or `mirror`.
    pub role: String,
    pub size_bytes: u64,
    /// The volume's current data generation, as hex.
    pub generation: String,
    /// The NBD URI clients connect to, e.g. `nbd://127.0.0.1:10809/db`.
    pub nbd: String,
    /// Whether the export refuses writes.
    #[serde(default)]
    pub read_only: bool,
    /// Open NBD client connections.
    #[serde(default)]
    pub connections: u64,
    /// On a primary, one entry per configured mirror.
    #[serde(default)]
    pub mirrors: Vec<MirrorStatus>,
    /// On a mirror, the primary that feeds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    /// On a mirror, its own data state: `in_sync`, `resyncing`,
    /// `inconsistent` (a resync was cut short) or `degraded` (consistent,
    /// possibly behind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// The generation record: current id, then earlier ones (`a <- b`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generations: Option<String>,
    /// Bytes the replication receiver applied (on a mirror).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_bytes: Option<u64>,
    /// The local disk: `ok`, or `failed` (marked failed after an I/O error
    /// with `on_primary_failure = "serve_from_mirror"`; served from a mirror).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_disk: Option<String>,
    /// On a primary with mirrors: `primary` or `balanced`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_policy: Option<String>,
    /// Cluster mode: the volume's fencing epoch as this node knows it (the
    /// one it holds as primary, or the newest seen as a mirror).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// `consistency_group`, if the volume is in one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency_group: Option<String>,
}

/// One replication link.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MirrorStatus {
    /// The peer's replication address.
    pub peer: String,
    /// `sync` or `async`.
    pub mode: String,
    /// `connected`, `connecting` or `disconnected`.
    pub connection: String,
    /// `in_sync`, `resyncing`, `degraded`, `suspended`, `inconsistent` or
    /// `split_brain`.
    pub state: String,
    pub out_of_sync_bytes: u64,
    pub lag_bytes: u64,
    pub lag_seconds: f64,
    pub resync_done_bytes: u64,
    pub resync_total_bytes: u64,
    /// The mirror node's name, once a handshake told it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_node: Option<String>,
    /// Requests sent and not yet acknowledged (seed 004's monitor).
    #[serde(default)]
    pub inflight_requests: u64,
    /// Age of the oldest of them, in milliseconds.
    #[serde(default)]
    pub oldest_request_ms: u64,
    /// Why the link last failed or could not connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The running or last verify of this mirror (`blockmirror verify`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verify: Option<crate::primary::verify::VerifyStatus>,
    /// Passes of the last iterative initial sync (0: none ran).
    #[serde(default)]
    pub resync_passes: u32,
    /// How long its final copy suspended host writes, in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_suspension_us: Option<u64>,
    /// The resync copy's rate limit in bytes per second (0: unlimited).
    #[serde(default)]
    pub resync_rate_bytes_per_sec: u64,
    /// Host reads this mirror served (remote reads: read balancing, or a
    /// failed local disk).
    #[serde(default)]
    pub reads_served: u64,
}

/// `bytes` in binary units with one decimal: `512 B`, `1.0 GiB`, `1.5 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    // Move up while the rounded value would show as 1024.0 or more.
    while value >= 1023.95 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Left-aligned columns separated by two spaces, no trailing spaces.
fn table(out: &mut String, indent: &str, rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let mut line = String::from(indent);
        for (c, cell) in row.iter().enumerate() {
            if c > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            if c + 1 < row.len() {
                let pad = widths[c].saturating_sub(cell.chars().count());
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

fn cells<const N: usize>(items: [&str; N]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The human-readable form of `status` for `blockmirror status`: one table of
/// volumes, then each volume's mirrors (or "no mirrors").
pub fn render_table(status: &NodeStatus) -> String {
    let mut out = format!("node {}\n\n", status.node);
    if status.volumes.is_empty() {
        out.push_str("no volumes\n");
        return out;
    }

    let mut rows = vec![cells([
        "VOLUME",
        "ROLE",
        "SIZE",
        "ACCESS",
        "CONNECTIONS",
        "GENERATION",
        "NBD",
    ])];
    for v in &status.volumes {
        rows.push(vec![
            v.name.clone(),
            v.role.clone(),
            human_bytes(v.size_bytes),
            if v.read_only {
                "read-only"
            } else {
                "read-write"
            }
            .to_string(),
            v.connections.to_string(),
            v.generation.clone(),
            v.nbd.clone(),
        ]);
    }
    table(&mut out, "", &rows);

    for v in &status.volumes {
        out.push('\n');
        match (&v.primary, &v.state) {
            (Some(p), Some(st)) => out.push_str(&format!("{}: mirror of {p}, {st}", v.name)),
            (Some(p), None) => out.push_str(&format!("{}: mirror of {p}", v.name)),
            (None, Some(st)) => {
                out.push_str(&format!("{}: mirror, no primary connected, {st}", v.name))
            }
            (None, None) => out.push_str(&format!("{}:", v.name)),
        }
        if v.local_disk.as_deref() == Some("failed") {
            out.push_str(" local disk FAILED, served from the mirror;");
        }
        if v.mirrors.is_empty() {
            out.push_str(if v.primary.is_some() || v.state.is_some() {
                "\n"
            } else {
                " no mirrors\n"
            });
            continue;
        }
        out.push('\n');
        let mut rows = vec![cells([
            "PEER",
            "MODE",
            "CONNECTION",
            "STATE",
            "OUT OF SYNC",
            "LAG",
            "RESYNC",
            "VERIFY",
        ])];
        for m in &v.mirrors {
            let mut resync = if m.resync_total_bytes == 0 {
                "-".to_string()
            } else {
                let pct = m.resync_done_bytes as f64 * 100.0 / m.resync_total_bytes as f64;
                format!(
                    "{} / {} ({pct:.1}%)",
                    human_bytes(m.resync_done_bytes),
                    human_bytes(m.resync_total_bytes)
                )
            };
            if m.resync_passes > 0 {
                resync += &format!(", {} passes", m.resync_passes);
            }
            if let Some(us) = m.resync_suspension_us {
                resync += &format!(", writes suspended {:.1} ms", us as f64 / 1000.0);
            }
            rows.push(vec![
                m.peer.clone(),
                m.mode.clone(),
                m.connection.clone(),
                m.state.clone(),
                human_bytes(m.out_of_sync_bytes),
                format!("{} / {:.1}s", human_bytes(m.lag_bytes), m.lag_seconds),
                resync,
                verify_cell(m.last_verify.as_ref()),
            ]);
        }
        table(&mut out, "  ", &rows);
    }
    out
}

/// The VERIFY column: the last verify's outcome, or its progress.
fn verify_cell(v: Option<&crate::primary::verify::VerifyStatus>) -> String {
    let Some(v) = v else {
        return "-".into();
    };
    let mode = if v.full { "full" } else { "checksums" };
    match v.state.as_str() {
        "running" => {
            let pct = v.done_bytes as f64 * 100.0 / v.total_bytes.max(1) as f64;
            format!("running {pct:.0}% ({mode})")
        }
        "differ" => format!(
            "differ: {} in {} ranges ({mode})",
            human_bytes(v.differing_bytes),
            v.differing.len()
        ),
        s => format!("{s} ({mode})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> NodeStatus {
        NodeStatus {
            cluster: None,
            node: "site-a".into(),
            volumes: vec![
                VolumeStatus {
                    name: "db".into(),
                    role: "primary".into(),
                    size_bytes: 1 << 30,
                    generation: "00000000deadbeef".into(),
                    nbd: "nbd://127.0.0.1:10809/db".into(),
                    read_only: false,
                    connections: 3,
                    mirrors: vec![MirrorStatus {
                        peer: "127.0.0.1:7701".into(),
                        mode: "sync".into(),
                        connection: "connected".into(),
                        state: "resyncing".into(),
                        out_of_sync_bytes: 3 << 20,
                        lag_bytes: 4096,
                        lag_seconds: 0.5,
                        resync_done_bytes: 1 << 20,
                        resync_total_bytes: 4 << 20,
                        peer_node: None,
                        inflight_requests: 0,
                        oldest_request_ms: 0,
                        last_error: None,
                        last_verify: Some(crate::primary::verify::VerifyStatus {
                            id: 3,
                            state: "differ".into(),
                            full: false,
                            mark: false,
                            started_unix: 1,
                            finished_unix: Some(2),
                            total_bytes: 1 << 30,
                            done_bytes: 1 << 30,
                            skipped_bytes: 0,
                            regions_waited: 0,
                            not_ready: 0,
                            differing_bytes: 128 << 10,
                            differing_truncated: false,
                            differing: vec![
                                crate::primary::verify::Range {
                                    offset: 0,
                                    len: 64 << 10,
                                },
                                crate::primary::verify::Range {
                                    offset: 1 << 20,
                                    len: 64 << 10,
                                },
                            ],
                            marked_bytes: 0,
                            error: None,
                        }),
                        resync_passes: 2,
                        resync_suspension_us: Some(1500),
                        resync_rate_bytes_per_sec: 0,
                        reads_served: 0,
                    }],
                    primary: None,
                    ..Default::default()
                },
                VolumeStatus {
                    name: "logs".into(),
                    role: "primary".into(),
                    size_bytes: 512 << 20,
                    generation: "01".into(),
                    nbd: "nbd+unix:///logs?socket=/run/logs.sock".into(),
                    read_only: true,
                    connections: 0,
                    mirrors: vec![],
                    primary: None,
                    ..Default::default()
                },
                VolumeStatus {
                    name: "copy".into(),
                    role: "mirror".into(),
                    size_bytes: 4096,
                    generation: "02".into(),
                    nbd: "nbd://127.0.0.1:10811/copy".into(),
                    read_only: true,
                    connections: 1,
                    mirrors: vec![],
                    primary: Some("site-b".into()),
                    state: Some("resyncing".into()),
                    ..Default::default()
                },
            ],
        }
    }

    #[test]
    fn a_failed_local_disk_shows_in_the_table() {
        let mut s = sample();
        assert!(!render_table(&s).contains("FAILED"));
        s.volumes[0].local_disk = Some("failed".into());
        let t = render_table(&s);
        assert!(
            t.contains("db: local disk FAILED, served from the mirror;"),
            "{t}"
        );
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["volumes"][0]["local_disk"], "failed");
        assert_eq!(json["volumes"][0]["mirrors"][0]["reads_served"], 0);
    }

    #[test]
    fn json_roundtrips() {
        let s = sample();
        let json = serde_json::to_string(&s).unwrap();
        let back: NodeStatus = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn json_field_names_follow_the_contract() {
        let v = serde_json::to_value(sample()).unwrap();
        let vol = &v["volumes"][0];
        for k in [
            "name",
            "role",
            "size_bytes",
            "generation",
            "nbd",
            "read_only",
            "connections",
            "mirrors",
        ] {
            assert!(vol.get(k).is_some(), "missing {k}");
        }
        assert!(
            vol.get("primary").is_none(),
            "primary is skipped when absent"
        );
        assert_eq!(v["volumes"][2]["primary"], "site-b");
        let m = &vol["mirrors"][0];
        for k in [
            "peer",
            "mode",
            "connection",
            "state",
            "out_of_sync_bytes",
            "lag_bytes",
            "lag_seconds",
            "resync_done_bytes",
            "resync_total_bytes",
        ] {
            assert!(m.get(k).is_some(), "missing mirror field {k}");
        }
        assert_eq!(m["lag_seconds"], 0.5);
    }

    #[test]
    fn json_tolerates_unknown_and_missing_optional_fields() {
        let json = r#"{"node":"n","future":1,"volumes":[{"name":"a","role":"primary",
            "size_bytes":512,"generation":"1","nbd":"nbd://x/a","new_field":[1]}]}"#;
        let s: NodeStatus = serde_json::from_str(json).unwrap();
        assert_eq!(s.volumes[0].connections, 0);
        assert!(s.volumes[0].mirrors.is_empty());
        assert_eq!(s.volumes[0].primary, None);
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(1 << 30), "1.0 GiB");
        assert_eq!(human_bytes((1 << 20) - 1), "1.0 MiB");
        assert_eq!(human_bytes(512 << 20), "512.0 MiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn table_contains_the_values_aligned() {
        let t = render_table(&sample());
        for needle in [
            "node site-a",
            "db",
            "primary",
            "1.0 GiB",
            "512.0 MiB",
            "4.0 KiB",
            "read-write",
            "read-only",
            "00000000deadbeef",
            "nbd://127.0.0.1:10809/db",
            "nbd+unix:///logs?socket=/run/logs.sock",
            "127.0.0.1:7701",
            "sync",
            "connected",
            "resyncing",
            "3.0 MiB",
            "4.0 KiB / 0.5s",
            "1.0 MiB / 4.0 MiB (25.0%)",
            "differ: 128.0 KiB in 2 ranges (checksums)",
            "logs: no mirrors",
            "copy: mirror of site-b, resyncing",
        ] {
            assert!(t.contains(needle), "table lacks {needle:?}:\n{t}");
        }
        // Columns line up: every volume row starts its NBD column where the header's does.
        let lines: Vec<&str> = t.lines().collect();
        let header = lines.iter().find(|l| l.starts_with("VOLUME")).unwrap();
        let col = header.find("NBD").unwrap();
        for uri in [
            "nbd://127.0.0.1:10809/db",
            "nbd+unix:///logs",
            "nbd://127.0.0.1:10811/copy",
        ] {
            let line = lines.iter().find(|l| l.contains(uri)).unwrap();
            assert_eq!(line.find(uri), Some(col), "misaligned:\n{t}");
        }
        assert!(
            t.lines().all(|l| l == l.trim_end()),
            "trailing spaces:\n{t}"
        );
    }

    #[test]
    fn empty_node_table() {
        let t = render_table(&NodeStatus {
            cluster: None,
            node: "n".into(),
            volumes: vec![],
        });
        assert!(t.contains("no volumes"));
    }
}
