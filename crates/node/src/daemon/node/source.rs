//! What the admin server reads and asks of the node ([`StatusSource`]), and
//! the node's metric registry.

use super::*;

/// The node's metric registry: the families of each part, in this order,
/// read at each scrape.
pub(super) fn metrics_registry(
    served: &Arc<ServedSet>,
    verify: &Arc<VerifyService>,
    jobs: Option<&Arc<JobService>>,
    cluster: Option<&Arc<crate::cluster::Agent>>,
) -> metrics::Registry {
    let mut reg = metrics::Registry::default();
    reg.register(
        "blockmirror_up",
        "1 while the node serves (the scrape reached it)",
        prometheus_client::metrics::gauge::ConstGauge::new(1i64),
    );
    let vols: metrics::VolumeList = {
        let s = served.clone();
        Arc::new(move || s.volumes())
    };
    metrics::register(&mut reg, vols.clone());
    crate::primary::link::register_link_metrics(&mut reg, vols.clone());
    let targets = {
        let s = served.clone();
        Arc::new(move || {
            s.all()
                .iter()
                .filter_map(|s| {
                    let t = s.target.as_ref()?;
                    Some((s.volume.name().to_owned(), t.apply_metrics.clone()))
                })
                .collect()
        })
    };
    crate::mirror::apply::register_apply_metrics(&mut reg, targets);
    crate::primary::register_metrics(&mut reg, vols.clone());
    crate::primary::reads::register_metrics(&mut reg, vols);
    verify.register_metrics(&mut reg);
    if let Some(j) = jobs {
        j.register_metrics(&mut reg);
    }
    if let Some(a) = cluster {
        crate::cluster::register_metrics(&mut reg, a.clone());
    }
    reg
}

impl StatusSource {
    /// `resync --discard-local`: this side gives up its data. A mirror again
    /// (writes refused; a primary here is demoted first), blank, so its
    /// primary copies the whole volume, and inconsistent until then.
    pub(super) fn discard_local(&self, s: &Served) -> Result<String, ControlError> {
        let volume = s.volume.name();
        let Some(t) = &s.target else {
            return Err(ControlError::Refused {
                volume: volume.to_owned(),
                reason: "this node has no `listen` address, so it cannot become a mirror: run \
                         --discard-local on the mirror node whose changes are to be thrown away"
                    .into(),
            });
        };
        // A promotion or demotion under way finishes first.
        let rt = tokio::runtime::Handle::current();
        rt.block_on(s.volume.role_cell().settled());
        if s.volume.role() == Role::Primary {
            // Demoted, then (DemotionStored) discarded.
            rt.block_on(demote_volume(
                &s.volume,
                t,
                Event::DiscardLocal,
                "resync --discard-local",
            ))?;
        } else {
            rt.block_on(
                RoleDriver {
                    volume: &s.volume,
                    target: Some(t),
                }
                .run(Event::DiscardLocal),
            )
            .map_err(|e| ControlError::Failed {
                volume: volume.to_owned(),
                reason: e.to_string(),
            })?;
        }
        let m = s.volume.meta();
        warn!(volume, generations = %m.generations.to_display(),
            "local changes discarded: a mirror again, waiting for a full copy from the primary");
        Ok(format!(
            "{volume}: local changes discarded; read-only mirror, a full resync follows when its primary connects"
        ))
    }

    pub(super) fn find(&self, volume: &str) -> Result<Arc<Served>, ControlError> {
        self.volumes
            .find(volume)
            .ok_or_else(|| ControlError::UnknownVolume(volume.to_owned()))
    }
}

impl AdminSource for StatusSource {
    fn observer(&self) -> Option<Arc<crate::daemon::events::Observer>> {
        Some(self.observer.clone())
    }

    fn reload_tls(&self) -> Result<String, (u16, String)> {
        let Some(t) = &self.tls else {
            return Err((409, "this node has no [tls] table".into()));
        };
        t.reload().map_err(|e| (500, e.to_string()))?;
        Ok(format!(
            "reloaded {}; new connections use it",
            t.settings().cert.display()
        ))
    }

    fn status(&self) -> NodeStatus {
        NodeStatus {
            node: self.node.clone(),
            volumes: self
                .volumes
                .all()
                .iter()
                .map(|s| &**s)
                .map(
                    |Served {
                         volume: v,
                         uri,
                         target,
                         group,
                     }| VolumeStatus {
                        consistency_group: group.clone(),
                        name: v.name().to_owned(),
                        role: v.role().as_str().to_owned(),
                        size_bytes: v.metrics().size_bytes(),
                        generation: v.generation(),
                        nbd: uri.clone(),
                        read_only: v.read_only(),
                        connections: v.metrics().connections(),
                        mirrors: v
                            .replicator()
                            .filter(|_| v.role() == Role::Primary)
                            .map(|r| {
                                r.links
                                    .iter()
                                    .map(|l| {
                                        let s = l.snapshot();
                                        MirrorStatus {
                                            peer: s.peer,
                                            mode: s.mode.as_str().into(),
                                            connection: s.connection.as_str().into(),
                                            state: s.state.as_str().into(),
                                            out_of_sync_bytes: s.out_of_sync_bytes,
                                            lag_bytes: s.lag_bytes,
                                            lag_seconds: s.lag.as_secs_f64(),
                                            resync_done_bytes: s.resync_done,
                                            resync_total_bytes: s.resync_total,
                                            peer_node: s.peer_node,
                                            inflight_requests: s.inflight as u64,
                                            oldest_request_ms: s
                                                .oldest_inflight
                                                .map_or(0, |d| d.as_millis() as u64),
                                            last_verify: self.verify.status(v.name(), &l.peer),
                                            last_error: s.last_error,
                                            resync_passes: s.passes,
                                            resync_suspension_us: s
                                                .last_suspension
                                                .map(|d| d.as_micros() as u64),
                                            resync_rate_bytes_per_sec: s.resync_rate,
                                            reads_served: v
                                                .reads()
                                                .map_or(0, |r| r.served_by(&l.peer)),
                                        }
                                    })
                                    .collect()
                            })
                            .unwrap_or_default(),
                        primary: target.as_ref().and_then(|t| t.primary()),
                        state: target.as_ref().and_then(|t| t.state()).map(str::to_owned),
                        generations: Some(v.meta().generations.to_display()),
                        applied_bytes: target
                            .as_ref()
                            .map(|t| t.applied_bytes.load(std::sync::atomic::Ordering::Relaxed)),
                        local_disk: v.disk().map(|d| d.state_str().to_owned()),
                        read_policy: v.reads().map(|r| r.policy().as_str().to_owned()),
                        epoch: v.fence().map(|f| f.epoch()),
                    },
                )
                .collect(),
            cluster: self.cluster.as_ref().map(|c| c.status()),
        }
    }

    fn promote(&self, volume: &str, req: &PromoteRequest) -> Result<String, ControlError> {
        let s = self.find(volume)?;
        let refused = |reason: String| ControlError::Refused {
            volume: volume.to_owned(),
            reason,
        };
        let Some(t) = &s.target else {
            return Err(refused(if s.volume.role() == Role::Primary {
                "already primary".into()
            } else {
                "this node has no `listen` address: it cannot be a mirror, nor be promoted".into()
            }));
        };
        tokio::runtime::Handle::current().block_on(promote_volume(&s.volume, t, req.force, false))
    }

    fn promote_group(&self, group: &str, req: &PromoteRequest) -> Result<String, ControlError> {
        let members: Vec<(Arc<Volume>, Arc<MirrorTarget>)> = self
            .volumes
            .all()
            .iter()
            .filter(|s| s.group.as_deref() == Some(group))
            .filter_map(|s| s.target.clone().map(|t| (s.volume.clone(), t)))
            .collect();
        if members.is_empty() {
            return Err(ControlError::UnknownVolume(format!("group {group}")));
        }
        tokio::runtime::Handle::current().block_on(promote_together(&members, req.force, false))
    }

    fn demote(&self, volume: &str, _req: &DemoteRequest) -> Result<String, ControlError> {
        let s = self.find(volume)?;
        let Some(t) = &s.target else {
            return Err(ControlError::Refused {
                volume: volume.to_owned(),
                reason: "this node has no `listen` address, so no primary could feed the volume \
                         as a mirror; add `listen` to its config"
                    .into(),
            });
        };
        tokio::runtime::Handle::current().block_on(demote_volume(
            &s.volume,
            t,
            Event::Demote,
            "demote requested",
        ))
    }

    fn resync(&self, volume: &str, req: &ResyncRequest) -> Result<String, ControlError> {
        let s = self.find(volume)?;
        let refused = |reason: String| ControlError::Refused {
            volume: volume.to_owned(),
            reason,
        };
        if req.discard_local {
            return self.discard_local(&s);
        }
        if s.volume.role() == Role::Primary {
            let Some(r) = s.volume.replicator() else {
                return Err(refused("not mirrored".into()));
            };
            if let Some(rate) = req.rate {
                for l in &r.links {
                    l.set_resync_rate(rate);
                }
            }
            let states: Vec<String> = r
                .links
                .iter()
                .map(|l| {
                    let sn = l.snapshot();
                    format!("{} {}", sn.peer, sn.state.as_str())
                })
                .collect();
            let rate = match req.rate {
                Some(0) => "; resync rate unlimited".to_string(),
                Some(n) => format!("; resync rate {n} bytes/s"),
                None => String::new(),
            };
            return Ok(format!(
                "{volume}: resync runs whenever a mirror connects ({}){rate}",
                states.join(", ")
            ));
        }
        let Some(t) = &s.target else {
            return Err(refused("not mirrored".into()));
        };
        if req.rate.is_some() {
            return Err(refused(
                "--rate is set on the primary, which paces the copy".into(),
            ));
        }
        Ok(format!(
            "{volume}: a mirror is resynced by its primary when it connects (state {})",
            t.state().unwrap_or("primary")
        ))
    }

    fn metrics(&self) -> String {
        metrics::render(&self.metrics)
    }

    fn set_mode(
        &self,
        volume: &str,
        req: &crate::daemon::admin::ModeRequest,
    ) -> Result<Vec<String>, (u16, String)> {
        let mode = crate::daemon::config::MirrorMode::from_name(&req.mode).ok_or_else(|| {
            (
                400,
                format!(
                    "{:?} is not a mode (expected \"sync\" or \"async\")",
                    req.mode
                ),
            )
        })?;
        let served = self
            .volumes
            .find(volume)
            .ok_or_else(|| (404, format!("no volume {volume} on this node")))?;
        let r = served
            .volume
            .replicator()
            .ok_or_else(|| (409, format!("volume {volume} has no mirrors here")))?;
        let links: Vec<_> = r
            .links
            .iter()
            .filter(|l| req.peer.as_deref().is_none_or(|p| p == l.peer))
            .collect();
        if links.is_empty() {
            return Err((404, format!("volume {volume} has no mirror {:?}", req.peer)));
        }
        // Cluster mode: a mirror about to lag is first taken off the
        // record's sync mirrors in step (it could not be promoted without
        // loss any more).
        if let (Some(agent), crate::daemon::config::MirrorMode::Async) = (&self.cluster, mode) {
            let nodes: Vec<String> = links
                .iter()
                .filter_map(|l| l.snapshot().peer_node)
                .collect();
            let handle = tokio::runtime::Handle::current();
            let switch = || {
                for l in &links {
                    l.set_mode(mode);
                }
            };
            tokio::task::block_in_place(|| {
                handle.block_on(agent.switch_to_async(volume, &nodes, switch))
            })
            .map_err(|e| {
                (
                    409,
                    format!("volume {volume}: the cluster record could not be updated first: {e}"),
                )
            })?;
        }
        Ok(links
            .into_iter()
            .map(|l| {
                l.set_mode(mode);
                l.peer.clone()
            })
            .collect())
    }

    fn set_faults(&self, volume: &str, req: &FaultRequest) -> Result<(), (u16, String)> {
        let s = self.find(volume).map_err(|e| (404, e.to_string()))?;
        match s.volume.disk() {
            Some(d) if d.set_faults(req) => {
                warn!(volume, faults = ?req, "injected faults set (fault_injection)");
                Ok(())
            }
            _ => Err((
                409,
                format!("volume {volume}: fault_injection is off (a test-only volume key)"),
            )),
        }
    }

    fn start_verify(&self, volume: &str, req: &VerifyRequest) -> Result<u64, (u16, String)> {
        if let Some(s) = self.volumes.find(volume) {
            if s.volume.role() == Role::Mirror {
                return Err((
                    409,
                    format!("volume {volume} is a mirror on this node: run verify on its primary"),
                ));
            }
        }
        self.verify
            .start(
                volume,
                req.full,
                req.mark,
                req.jobs
                    .unwrap_or(crate::primary::verify::default_jobs(req.full)),
            )
            .map_err(|e| (e.http_status(), e.to_string()))
    }
}
