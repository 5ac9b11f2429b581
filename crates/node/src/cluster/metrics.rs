//! Cluster mode's metric families.

use super::*;

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
