//! Role changes: `promote`, `demote`, a consistency group's promotion, and
//! the cluster agent's requests for them ([`ClusterRoles`]).

use super::*;

/// Promotes `s` here: `promote` by hand, or in cluster mode by the agent
/// once the old primary's lease lapsed (`primary_gone`: a link it may still
/// seem to feed does not count; promoting cuts it).
pub(super) async fn promote_volume(
    s: &Volume,
    t: &MirrorTarget,
    force: bool,
    primary_gone: bool,
) -> Result<String, ControlError> {
    let volume = s.name();
    let refused = |reason: String| ControlError::Refused {
        volume: volume.to_owned(),
        reason,
    };
    // A promotion or demotion under way finishes first.
    s.role_cell().settled().await;
    // The link is refused first (the role says promoting), so nothing of
    // the old primary lands after the new generation; then the durable
    // record; then the links to this volume's own mirrors; then the
    // export turns read-write (the role says primary).
    let fed = t.primary().filter(|_| !primary_gone);
    let promoted = RoleDriver {
        volume: s,
        target: Some(t),
    }
    .run(Event::Promote {
        force,
        fed: fed.is_some(),
        label: s.meta().label,
    })
    .await;
    match promoted {
        Ok(()) => {}
        Err(DriveError::Role(RoleError::Fed)) => {
            return Err(refused(format!(
                "its primary {} is connected and feeding it; stop that node first, or use --force",
                fed.unwrap_or_default()
            )))
        }
        Err(DriveError::Role(RoleError::Inconsistent)) => return Err(refused(
            "its data is inconsistent (a resync did not finish); use --force to promote it anyway"
                .into(),
        )),
        Err(DriveError::Role(e @ RoleError::Illegal { state, .. })) => {
            return Err(refused(if state.role == roles::Role::Primary {
                "already primary".into()
            } else {
                e.to_string()
            }))
        }
        Err(DriveError::Failed(reason)) => {
            return Err(ControlError::Failed {
                volume: volume.to_owned(),
                reason,
            })
        }
    }
    let m = s.meta();
    let mirrors = match s.replicator() {
        Some(r) => {
            format!(
                "; mirroring to {}",
                r.links
                    .iter()
                    .map(|l| l.peer.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
        None => {
            warn!(volume, "promoted without [[volume.mirror]] tables: nothing mirrors it now, and its old primary cannot fail back to it");
            "; no mirrors configured here (add [[volume.mirror]] for failback)".into()
        }
    };
    warn!(volume, generations = %m.generations.to_display(), forced = force,
        "promoted to primary: the export is read-write, new generation");
    Ok(format!(
        "{volume}: promoted to primary (generation {}); new NBD connections are read-write{mirrors}",
        m.generations.to_display()
    ))
}

/// Promotes several volumes at one point (a consistency group): first every
/// one refuses its old primary and cuts that link, so no volume takes a
/// write of the old primary after another stopped taking them; then each
/// is promoted. One volume: [`promote_volume`].
pub(super) async fn promote_together(
    members: &[(Arc<Volume>, Arc<MirrorTarget>)],
    force: bool,
    primary_gone: bool,
) -> Result<String, ControlError> {
    if let [(v, t)] = members {
        return promote_volume(v, t, force, primary_gone).await;
    }
    for (v, t) in members {
        if v.role() == Role::Mirror {
            t.cut_link();
        }
    }
    let mut done = Vec::new();
    for (v, t) in members {
        if v.role() == Role::Primary {
            done.push(format!("{}: already primary", v.name()));
            continue;
        }
        match promote_volume(v, t, force, primary_gone).await {
            Ok(m) => done.push(m),
            Err(e) => {
                return Err(ControlError::Failed {
                    volume: v.name().to_owned(),
                    reason: format!(
                        "{e}; promoted before it: {}",
                        if done.is_empty() {
                            "none".into()
                        } else {
                            done.join("; ")
                        }
                    ),
                })
            }
        }
    }
    Ok(done.join("\n"))
}

/// Makes `volume` a mirror on this node: `demote` (`event` Demote), and
/// `resync --discard-local` on a primary (DiscardLocal). New host writes get
/// EPERM at once; the writes in progress finish; every live mirror is
/// flushed and the links park (what they had not confirmed stays marked,
/// and is reported to the next primary as this side's divergent regions);
/// the local disk is flushed; the record says "consistent"; then a primary
/// may connect. (A returning old primary that found its mirror promoted past
/// it does the same, from the link's `on_peer_ahead`.)
pub(super) async fn demote_volume(
    volume: &Volume,
    target: &MirrorTarget,
    event: Event,
    why: &str,
) -> Result<String, ControlError> {
    let actions = volume
        .role_cell()
        .feed(event)
        .map_err(|_| ControlError::Refused {
            volume: volume.name().to_owned(),
            reason: "already a mirror".into(),
        })?;
    finish_demote(volume, target, actions, why).await
}

/// The rest of a demote: the role already refuses host writes; performs
/// `actions` (what the demoting event returned).
pub(super) async fn finish_demote(
    volume: &Volume,
    target: &MirrorTarget,
    actions: Vec<Action>,
    why: &str,
) -> Result<String, ControlError> {
    let name = volume.name().to_owned();
    let started = std::time::Instant::now();
    RoleDriver {
        volume,
        target: Some(target),
    }
    .perform_all(actions)
    .await
    .map_err(|e| ControlError::Failed {
        volume: name.clone(),
        reason: e.to_string(),
    })?;
    let m = volume.meta();
    warn!(volume = %name, why, generations = %m.generations.to_display(),
        ms = started.elapsed().as_millis() as u64,
        "demoted: a read-only mirror now, waiting for its new primary to connect");
    Ok(format!(
        "{name}: demoted to mirror (generation {}); the export is read-only; the primary that \
         connects next copies only what differs",
        m.generations.to_display()
    ))
}

impl ClusterRoles {
    pub(super) fn find(
        &self,
        name: &str,
    ) -> Result<(Arc<Volume>, Option<Arc<MirrorTarget>>), String> {
        self.volumes
            .find(name)
            .map(|s| (s.volume.clone(), s.target.clone()))
            .ok_or_else(|| format!("{name}: no such volume"))
    }
}

impl crate::cluster::Roles for ClusterRoles {
    fn promote<'a>(
        &'a self,
        volumes: &'a [String],
    ) -> crate::cluster::BoxFut<'a, Result<String, String>> {
        Box::pin(async move {
            let mut members = Vec::new();
            for name in volumes {
                let (v, t) = self.find(name)?;
                let t = t.ok_or("no `listen`: it cannot be promoted")?;
                members.push((v, t));
            }
            promote_together(&members, false, true)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn demote<'a>(
        &'a self,
        volume: &'a str,
        why: String,
    ) -> crate::cluster::BoxFut<'a, Result<String, String>> {
        Box::pin(async move {
            let (v, t) = self.find(volume)?;
            let t = t.ok_or("no `listen`: it cannot be a mirror")?;
            if v.role() != Role::Primary {
                return Ok(format!("{volume}: already a mirror"));
            }
            demote_volume(&v, &t, Event::Demote, &why)
                .await
                .map_err(|e| e.to_string())
        })
    }
}
