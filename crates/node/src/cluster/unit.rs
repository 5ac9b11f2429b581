//! A unit: what fails over as one (a volume, or a consistency group's
//! volumes on this node).

use super::*;

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
    pub(super) fn all(volumes: &[Arc<ClusterVolume>]) -> Vec<Unit> {
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

    pub(super) fn volume_generations(&self) -> std::collections::BTreeMap<String, String> {
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

    pub(super) fn volume_names(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| m.volume.name().to_owned())
            .collect()
    }

    /// Primary here if any member is (a group half promoted steps down, or
    /// takes the key, as a whole).
    pub(super) fn primary_here(&self) -> bool {
        self.members
            .iter()
            .any(|m| m.volume.role() == Role::Primary)
    }

    /// The generation the unit publishes and is judged by: the volume's, or
    /// for a group a digest of every member's (0 while any member is blank).
    pub(super) fn generation(&self) -> u64 {
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

    pub(super) fn report(&self, node: &str) -> Option<decide::MirrorReport> {
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
    pub(super) fn in_step(&self) -> Vec<String> {
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

    pub(super) fn raise(&self, epoch: u64) {
        for m in &self.members {
            if m.fence.raise(epoch) {
                if let Some(t) = &m.target {
                    t.epoch_raised(epoch);
                }
            }
        }
    }

    pub(super) fn hold(&self, epoch: u64) {
        for m in &self.members {
            m.fence.hold(epoch);
        }
    }

    pub(super) fn release(&self) {
        for m in &self.members {
            m.fence.release();
        }
    }

    pub(super) fn holds(&self) -> u64 {
        self.members
            .iter()
            .map(|m| m.fence.holds())
            .min()
            .unwrap_or(0)
    }

    pub(super) fn epoch(&self) -> u64 {
        self.members
            .iter()
            .map(|m| m.fence.epoch())
            .max()
            .unwrap_or(0)
    }

    pub(super) fn mark_synced(&self) {
        for m in &self.members {
            m.fence.mark_synced();
        }
    }

    /// The coordinator holds every member's current generation now.
    pub(super) fn published(&self) {
        for m in &self.members {
            if let Some(r) = m.volume.replicator() {
                r.gen.published(m.volume.meta().generations.current);
            }
        }
    }
}
