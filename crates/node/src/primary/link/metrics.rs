//! The link's families in /metrics: what it replicated, its lag, its
//! connection's failures and its resync, labelled by volume and peer.

use std::sync::Arc;

use super::{LinkSnapshot, MirrorLink};
use crate::daemon::config::Role;
use crate::daemon::metrics::{self, MetricType};

use blockmirror_nbd::Export as _;

/// Registers the links' families of the primary volumes among `volumes`
/// (a mirror's own links are parked and not shown: they would read as
/// degraded mirrors).
pub fn register_link_metrics(registry: &mut metrics::Registry, volumes: metrics::VolumeList) {
    registry.register_collector(metrics::FnCollector::boxed("links", move |enc| {
        let volumes = volumes();
        let links: Vec<(&str, &Arc<MirrorLink>)> = volumes
            .iter()
            .filter(|v| v.role() == Role::Primary)
            .filter_map(|v| v.replicator().map(|r| (v.name(), r)))
            .flat_map(|(name, r)| r.links.iter().map(move |l| (name, l)))
            .collect();
        encode_link_metrics(enc, &links)
    }));
}

/// Per-mirror families, labelled by volume and peer, for /metrics.
pub fn encode_link_metrics(
    enc: &mut metrics::Encoder<'_>,
    links: &[(&str, &Arc<MirrorLink>)],
) -> std::fmt::Result {
    use std::sync::atomic::Ordering::Relaxed;
    type Get = fn(&MirrorLink, &LinkSnapshot) -> f64;
    let families: [(&str, MetricType, &str, Get); 24] = [
        (
            "blockmirror_mirror_lag_bytes",
            MetricType::Gauge,
            "Async: write data answered to hosts and not yet acknowledged by the mirror.",
            |_, s| s.lag_bytes as f64,
        ),
        (
            "blockmirror_mirror_lag_seconds",
            MetricType::Gauge,
            "Async: age of the oldest write the mirror has not acknowledged (the RPO now).",
            |_, s| s.lag.as_secs_f64(),
        ),
        (
            "blockmirror_mirror_epochs_total",
            MetricType::Counter,
            "Async: epoch barriers sent (a write followed an answered one).",
            |l, _| l.barriers.load(Relaxed) as f64,
        ),
        (
            "blockmirror_mirror_group_gates_total",
            MetricType::Counter,
            "Async consistency group: times this link held its next writes until the other members' earlier writes were acknowledged by the site.",
            |l, _| l.counters.group_gates.load(Relaxed) as f64,
        ),
        (
            "blockmirror_mirror_throttled_writes_total",
            MetricType::Counter,
            "Async: host writes that waited for the mirror because the lag was past its bound.",
            |l, _| l.counters.throttled.load(Relaxed) as f64,
        ),
        (
            "blockmirror_replicated_bytes_total",
            MetricType::Counter,
            "Bytes of host writes acknowledged by the mirror.",
            |l, _| l.counters.bytes_replicated.load(Relaxed) as f64,
        ),
        (
            "blockmirror_replicated_requests_total",
            MetricType::Counter,
            "Requests acknowledged by the mirror.",
            |l, _| l.counters.requests_acked.load(Relaxed) as f64,
        ),
        (
            "blockmirror_out_of_sync_bytes",
            MetricType::Gauge,
            "Bytes marked in the mirror's out-of-sync bitmap.",
            |_, s| s.out_of_sync_bytes as f64,
        ),
        (
            "blockmirror_link_reconnects_total",
            MetricType::Counter,
            "Times the mirror link connected again after a failure.",
            |l, _| l.counters.reconnects.load(Relaxed) as f64,
        ),
        (
            "blockmirror_link_failures_total",
            MetricType::Counter,
            "Times the mirror link failed (error, close or timeout).",
            |l, _| l.counters.failures.load(Relaxed) as f64,
        ),
        (
            "blockmirror_resync_bytes_total",
            MetricType::Counter,
            "Bytes copied to the mirror to bring it back in sync.",
            |l, _| l.counters.resync_bytes.load(Relaxed) as f64,
        ),
        (
            "blockmirror_resync_read_errors_total",
            MetricType::Counter,
            "Resync chunks whose local read failed (they stay marked; retried after a growing pause).",
            |l, _| l.counters.catch_up_read_failures.load(Relaxed) as f64,
        ),
        (
            "blockmirror_resync_divergent_bytes_total",
            MetricType::Counter,
            "Bytes the mirror reported as its own writes this primary may lack (a returning old primary's, at failback), copied from here.",
            |l, _| l.counters.divergent_bytes.load(Relaxed) as f64,
        ),
        (
            "blockmirror_resync_skipped_bytes_total",
            MetricType::Counter,
            "Bytes a checksum resync found equal on the mirror and did not send.",
            |l, _| l.counters.resync_skipped_bytes.load(Relaxed) as f64,
        ),
        (
            "blockmirror_resync_suspensions_total",
            MetricType::Counter,
            "Final copies of an iterative initial sync (each suspends host writes briefly).",
            |l, _| l.counters.suspensions.load(Relaxed) as f64,
        ),
        (
            "blockmirror_resync_suspended_seconds_total",
            MetricType::Counter,
            "Time host writes were suspended by final copies, summed.",
            |l, _| l.counters.suspended_us.load(Relaxed) as f64 / 1e6,
        ),
        (
            "blockmirror_resync_last_suspension_seconds",
            MetricType::Gauge,
            "How long the last final copy suspended host writes.",
            |_, s| s.last_suspension.map_or(0.0, |d| d.as_secs_f64()),
        ),
        (
            "blockmirror_resync_done_bytes",
            MetricType::Gauge,
            "Bytes the current or last resync of this mirror has copied or found equal.",
            |_, s| s.resync_done as f64,
        ),
        (
            "blockmirror_resync_total_bytes",
            MetricType::Gauge,
            "Bytes the current or last resync of this mirror covers.",
            |_, s| s.resync_total as f64,
        ),
        (
            "blockmirror_resync_rate_bytes_per_second",
            MetricType::Gauge,
            "The resync's pacing rate (0: unlimited).",
            |_, s| s.resync_rate as f64,
        ),
        (
            "blockmirror_mirror_max_lag_bytes",
            MetricType::Gauge,
            "Async: the configured lag bound in bytes (max_lag_bytes).",
            |l, _| l.max_lag_bytes() as f64,
        ),
        (
            "blockmirror_mirror_max_lag_seconds",
            MetricType::Gauge,
            "Async: the configured lag bound in time (max_lag).",
            |l, _| l.max_lag().as_secs_f64(),
        ),
        (
            "blockmirror_mirror_inflight_requests",
            MetricType::Gauge,
            "Requests sent to the mirror and not yet acknowledged.",
            |_, s| s.inflight as f64,
        ),
        (
            "blockmirror_mirror_oldest_request_seconds",
            MetricType::Gauge,
            "Age of the oldest unacknowledged mirror request (the watchdog's view).",
            |_, s| s.oldest_inflight.map_or(0.0, |d| d.as_secs_f64()),
        ),
    ];
    if links.is_empty() {
        return Ok(());
    }
    let snaps: Vec<_> = links.iter().map(|(_, l)| l.snapshot()).collect();
    for (name, kind, help, get) in families {
        let mut f = metrics::family(enc, name, kind, help)?;
        for ((vol, l), s) in links.iter().zip(&snaps) {
            f.sample(&[("volume", vol), ("peer", &l.peer)], get(l, s))?;
        }
    }
    let mut f = metrics::family(
        enc,
        "blockmirror_mirror_state",
        MetricType::Gauge,
        "1 for the mirror's current state.",
    )?;
    for ((vol, l), s) in links.iter().zip(&snaps) {
        for st in [
            "in_sync",
            "resyncing",
            "degraded",
            "inconsistent",
            "suspended",
            "split_brain",
        ] {
            let v = u8::from(s.state.as_str() == st);
            f.sample(&[("volume", vol), ("peer", &l.peer), ("state", st)], v)?;
        }
    }
    Ok(())
}
