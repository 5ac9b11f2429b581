//! Cluster mode's decisions, pure: who may be a volume's primary, and which
//! mirror is promoted when its primary's lease is gone.
//!
//! The coordinator (etcd; `blockmirror-node`'s `cluster` module does the
//! I/O) holds, per replication group (a volume, or a consistency group):
//!
//! - the **record** ([`Record`]), not leased, so it outlives its primary:
//!   the fencing epoch, the primary that holds it, the generation that
//!   primary last published and which mirrors were then sync mirrors in
//!   step with it. A primary publishes a new generation there *before* it
//!   acknowledges a write under it, so a mirror whose generation equals the
//!   record's, and that the record lists, holds every acknowledged write;
//! - the **primary key**, attached to the primary's lease: while it exists
//!   the primary is alive (or has not yet fenced itself);
//! - one **report** per live mirror ([`MirrorReport`]), attached to that
//!   mirror node's lease.
//!
//! Every decision here is applied by one etcd transaction that compares the
//! revisions it was made on, so two nodes deciding at once cannot both win.

/// `[cluster] auto_promote`: which mirrors may be promoted automatically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AutoPromote {
    /// Only a sync mirror that holds every acknowledged write.
    #[default]
    SyncOnly,
    /// Also a mirror that may lack the last writes (an async mirror, or a
    /// sync one that fell out of step): its lag is given up, logged and
    /// counted.
    Any,
    /// Never: failover stays manual.
    Never,
}

impl AutoPromote {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "sync_only" => Some(Self::SyncOnly),
            "any" => Some(Self::Any),
            "never" => Some(Self::Never),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::SyncOnly => "sync_only",
            Self::Any => "any",
            Self::Never => "never",
        }
    }
}

/// A replication group's record in the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The fencing epoch: raised by one on every change of primary.
    pub epoch: u64,
    /// The node that took `epoch`.
    pub primary: String,
    /// The primary's current generation, published before any write under
    /// it is acknowledged.
    pub generation: u64,
    /// Mirrors that were sync mirrors, live and in step, when `generation`
    /// was published (or joined it since).
    pub sync_mirrors: Vec<String>,
}

/// A mirror's data as it says of itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataState {
    /// Fed by its primary and in step.
    InSync,
    /// A consistent image (a point the primary passed through).
    Consistent,
    /// A resync did not finish: not a usable image.
    Inconsistent,
}

/// What a live mirror node reports about one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorReport {
    pub node: String,
    pub generation: u64,
    pub data: DataState,
}

/// Why a mirror may not be promoted automatically.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ineligible {
    /// Its image is not consistent.
    Inconsistent,
    /// It may lack acknowledged writes, and the policy is `sync_only`.
    MayLackWrites,
    /// The policy is `never`.
    Manual,
}

impl std::fmt::Display for Ineligible {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Ineligible::Inconsistent => "its image is inconsistent (a resync did not finish)",
            Ineligible::MayLackWrites => {
                "it may lack acknowledged writes (not a sync mirror in step with the last \
                 published generation) and auto_promote is sync_only"
            }
            Ineligible::Manual => "auto_promote is never",
        })
    }
}

/// Whether `m` may be promoted automatically; `Ok(true)` when it holds
/// every acknowledged write (nothing is given up).
pub fn candidacy(
    record: &Record,
    m: &MirrorReport,
    policy: AutoPromote,
) -> Result<bool, Ineligible> {
    if policy == AutoPromote::Never {
        return Err(Ineligible::Manual);
    }
    if m.data == DataState::Inconsistent {
        return Err(Ineligible::Inconsistent);
    }
    let lossless = m.generation == record.generation
        && m.generation != 0
        && record.sync_mirrors.contains(&m.node);
    match (lossless, policy) {
        (true, _) => Ok(true),
        (false, AutoPromote::Any) => Ok(false),
        (false, _) => Err(Ineligible::MayLackWrites),
    }
}

/// The mirror to promote when the primary is gone: among the eligible ones,
/// first those that hold every acknowledged write, then those at the
/// record's generation, then by node name (so that every node computes the
/// same choice). `None` if nobody is eligible. Returns the node and whether
/// the promotion is lossless.
pub fn choose<'a>(
    record: &Record,
    reports: &'a [MirrorReport],
    policy: AutoPromote,
) -> Option<(&'a str, bool)> {
    reports
        .iter()
        .filter(|m| m.node != record.primary)
        .filter_map(|m| candidacy(record, m, policy).ok().map(|l| (m, l)))
        .min_by(|(a, la), (b, lb)| {
            lb.cmp(la)
                .then((b.generation == record.generation).cmp(&(a.generation == record.generation)))
                .then(a.node.cmp(&b.node))
        })
        .map(|(m, l)| (m.node.as_str(), l))
}

/// A node's own view of one replication group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Local<'a> {
    pub node: &'a str,
    /// Whether the volume is primary here (its role), and
    pub primary: bool,
    /// the epoch at which this node holds the primary key, if it does.
    pub holds: Option<u64>,
}

/// What the coordinator says of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View<'a> {
    pub record: Option<&'a Record>,
    /// The live primary key: (node, epoch).
    pub key: Option<(&'a str, u64)>,
    pub reports: &'a [MirrorReport],
    /// The record's primary node is registered (its node lease is live) and
    /// does not report as a mirror: it lost only its key (etcd lost quorum,
    /// or its lease lapsed and came back) and is about to take it again, so
    /// no mirror is promoted in its place.
    pub primary_alive: bool,
}

/// What a node does about a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing to do.
    Stay,
    /// No record yet and this node is the primary: take epoch 1.
    Bootstrap,
    /// The record names this node and no key is live (it restarted, or its
    /// lease lapsed and came back): take the key again at `epoch`.
    Reacquire { epoch: u64 },
    /// Another node holds a newer epoch while this one is primary: stop
    /// (demote, then be fed by it).
    StepDown { by: String, epoch: u64 },
    /// The primary is gone and this node is the chosen mirror: take `epoch`
    /// and promote. `lossless` false: the policy allowed giving up its lag.
    Promote { epoch: u64, lossless: bool },
    /// The primary is gone, and nobody may be promoted automatically.
    NoCandidate,
}

/// Decides what `local` does about a group the coordinator shows as `view`.
pub fn decide(local: &Local<'_>, view: &View<'_>, policy: AutoPromote) -> Decision {
    let Some(record) = view.record else {
        return if local.primary {
            Decision::Bootstrap
        } else {
            Decision::Stay
        };
    };
    if let Some((holder, epoch)) = view.key {
        if holder != local.node && local.primary && local.holds.is_none_or(|e| e < epoch) {
            return Decision::StepDown {
                by: holder.to_owned(),
                epoch,
            };
        }
        return Decision::Stay;
    }
    // No live key: the record's primary is gone (or is this node).
    if record.primary == local.node {
        if local.primary {
            return Decision::Reacquire {
                epoch: record.epoch + 1,
            };
        }
        // Demoted here since: another node is promoted below, or nobody.
    } else if view.primary_alive {
        return Decision::Stay;
    } else if local.primary {
        // A primary here that the record does not name: a newer epoch was
        // taken elsewhere while this node was away.
        return Decision::StepDown {
            by: record.primary.clone(),
            epoch: record.epoch,
        };
    }
    match choose(record, view.reports, policy) {
        Some((n, lossless)) if n == local.node => Decision::Promote {
            epoch: record.epoch + 1,
            lossless,
        },
        Some(_) => Decision::Stay,
        None => Decision::NoCandidate,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rec(primary: &str, generation: u64, sync: &[&str]) -> Record {
        Record {
            epoch: 7,
            primary: primary.into(),
            generation,
            sync_mirrors: sync.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn rep(node: &str, generation: u64, data: DataState) -> MirrorReport {
        MirrorReport {
            node: node.into(),
            generation,
            data,
        }
    }

    #[test]
    fn only_a_sync_mirror_at_the_published_generation_is_lossless() {
        let r = rec("a", 5, &["b"]);
        let ok = |m: &MirrorReport, p| candidacy(&r, m, p);
        assert_eq!(
            ok(&rep("b", 5, DataState::InSync), AutoPromote::SyncOnly),
            Ok(true)
        );
        // Connected or not: what counts is the generation it holds.
        assert_eq!(
            ok(&rep("b", 5, DataState::Consistent), AutoPromote::SyncOnly),
            Ok(true)
        );
        // Behind the published generation: it missed writes.
        assert_eq!(
            ok(&rep("b", 4, DataState::Consistent), AutoPromote::SyncOnly),
            Err(Ineligible::MayLackWrites)
        );
        // Not a sync mirror (async): may lag.
        assert_eq!(
            ok(&rep("c", 5, DataState::InSync), AutoPromote::SyncOnly),
            Err(Ineligible::MayLackWrites)
        );
        assert_eq!(
            ok(&rep("c", 5, DataState::InSync), AutoPromote::Any),
            Ok(false)
        );
        assert_eq!(
            ok(&rep("b", 5, DataState::Inconsistent), AutoPromote::Any),
            Err(Ineligible::Inconsistent)
        );
        assert_eq!(
            ok(&rep("b", 5, DataState::InSync), AutoPromote::Never),
            Err(Ineligible::Manual)
        );
    }

    #[test]
    fn the_choice_prefers_lossless_then_the_generation_then_the_name() {
        let r = rec("a", 5, &["c"]);
        let reports = [
            rep("b", 5, DataState::InSync),
            rep("c", 5, DataState::InSync),
            rep("d", 4, DataState::Consistent),
        ];
        assert_eq!(
            choose(&r, &reports, AutoPromote::SyncOnly),
            Some(("c", true))
        );
        assert_eq!(choose(&r, &reports, AutoPromote::Any), Some(("c", true)));
        let lossy = [
            rep("d", 4, DataState::Consistent),
            rep("e", 5, DataState::Consistent),
        ];
        assert_eq!(choose(&r, &lossy, AutoPromote::SyncOnly), None);
        assert_eq!(choose(&r, &lossy, AutoPromote::Any), Some(("e", false)));
        // The old primary's own report never counts.
        let own = [rep("a", 5, DataState::InSync)];
        assert_eq!(choose(&rec("a", 5, &["a"]), &own, AutoPromote::Any), None);
    }

    #[test]
    fn decisions() {
        let r = rec("a", 5, &["b"]);
        let reports = [rep("b", 5, DataState::InSync)];
        let view = |key| View {
            record: Some(&r),
            key,
            reports: &reports,
            primary_alive: false,
        };
        let local = |node, primary, holds| Local {
            node,
            primary,
            holds,
        };
        let p = AutoPromote::SyncOnly;
        // Bootstrap: only the primary takes the first epoch.
        let empty = View {
            record: None,
            key: None,
            reports: &[],
            primary_alive: false,
        };
        assert_eq!(
            decide(&local("a", true, None), &empty, p),
            Decision::Bootstrap
        );
        assert_eq!(decide(&local("b", false, None), &empty, p), Decision::Stay);
        // A live key: everybody stays, except a primary that is not its holder.
        assert_eq!(
            decide(&local("a", true, Some(7)), &view(Some(("a", 7))), p),
            Decision::Stay
        );
        assert_eq!(
            decide(&local("b", false, None), &view(Some(("a", 7))), p),
            Decision::Stay
        );
        assert_eq!(
            decide(&local("c", true, Some(6)), &view(Some(("a", 7))), p),
            Decision::StepDown {
                by: "a".into(),
                epoch: 7
            }
        );
        // The key is gone: the chosen mirror promotes at the next epoch.
        assert_eq!(
            decide(&local("b", false, None), &view(None), p),
            Decision::Promote {
                epoch: 8,
                lossless: true
            }
        );
        assert_eq!(
            decide(&local("z", false, None), &view(None), p),
            Decision::Stay
        );
        assert_eq!(
            decide(&local("b", false, None), &view(None), AutoPromote::Never),
            Decision::NoCandidate
        );
        // The old primary coming back with no key live: it takes it again.
        assert_eq!(
            decide(&local("a", true, None), &view(None), p),
            Decision::Reacquire { epoch: 8 }
        );
        // The old primary is alive (it lost only its key): nobody is
        // promoted, it takes the key again.
        let alive = View {
            primary_alive: true,
            ..view(None)
        };
        assert_eq!(decide(&local("b", false, None), &alive, p), Decision::Stay);
        assert_eq!(
            decide(&local("a", true, None), &alive, p),
            Decision::Reacquire { epoch: 8 }
        );
        // A primary the record does not name steps down.
        assert_eq!(
            decide(&local("c", true, None), &view(None), p),
            Decision::StepDown {
                by: "a".into(),
                epoch: 7
            }
        );
    }

    fn data() -> impl Strategy<Value = DataState> {
        prop_oneof![
            Just(DataState::InSync),
            Just(DataState::Consistent),
            Just(DataState::Inconsistent)
        ]
    }

    proptest! {
        /// Every node that sees the same view decides the same thing: at
        /// most one of them promotes, never one that could lack writes
        /// under sync_only, and never the record's own primary.
        #[test]
        fn at_most_one_node_promotes(
            gens in proptest::collection::vec((0u64..4, data(), any::<bool>()), 1..6),
            record_gen in 0u64..4,
            any_policy in any::<bool>(),
        ) {
            let names: Vec<String> = (0..gens.len()).map(|i| format!("n{i}")).collect();
            let reports: Vec<MirrorReport> = names.iter().zip(&gens)
                .map(|(n, (g, d, _))| rep(n, *g, *d)).collect();
            let sync: Vec<&str> = names.iter().zip(&gens)
                .filter(|(_, (_, _, s))| *s).map(|(n, _)| n.as_str()).collect();
            let r = rec("n0", record_gen, &sync);
            let policy = if any_policy { AutoPromote::Any } else { AutoPromote::SyncOnly };
            let view = View { record: Some(&r), key: None, reports: &reports, primary_alive: false };
            let promoting: Vec<(&String, Decision)> = names.iter()
                .map(|n| (n, decide(&Local { node: n, primary: false, holds: None }, &view, policy)))
                .filter(|(_, d)| matches!(d, Decision::Promote { .. }))
                .collect();
            prop_assert!(promoting.len() <= 1);
            if let Some((n, Decision::Promote { lossless, epoch })) = promoting.first() {
                prop_assert_ne!(n.as_str(), "n0");
                prop_assert_eq!(*epoch, r.epoch + 1);
                let m = reports.iter().find(|m| &m.node == *n).unwrap();
                prop_assert_ne!(m.data, DataState::Inconsistent);
                if policy == AutoPromote::SyncOnly {
                    prop_assert!(*lossless);
                    prop_assert_eq!(m.generation, record_gen);
                }
            }
        }
    }
}
