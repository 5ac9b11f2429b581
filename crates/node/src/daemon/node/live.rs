//! What a serving node adds a volume with: its NBD listener, the parts
//! that take a volume opened at run time ([`Live`]), and the served set.

use super::*;

/// Binds a volume's NBD listener; returns it with the export's URI.
pub(super) async fn bind_nbd(v: &OpenVolume) -> Result<(Listener, String), NodeError> {
    let listener = bind_addr(&v.nbd, v.volume.name()).await?;
    let uri = export_uri(&listener, &v.nbd, v.volume.name());
    Ok((listener, uri))
}

pub(super) async fn bind_addr(nbd: &NbdListen, volume: &str) -> Result<Listener, NodeError> {
    let addr = match nbd {
        NbdListen::Tcp(a) => ListenAddr::Tcp(*a),
        NbdListen::Unix(p) => ListenAddr::Unix(p.clone()),
    };
    Listener::bind(&addr)
        .await
        .map_err(|source| NodeError::Bind {
            what: format!("volume {volume} NBD"),
            addr: nbd.to_string(),
            source,
        })
}

/// The export's URI (the port the listener got, if it asked for 0).
pub(super) fn export_uri(listener: &Listener, nbd: &NbdListen, volume: &str) -> String {
    match listener.local_addr() {
        Ok(ListenAddr::Tcp(a)) => NbdListen::Tcp(a).uri(volume),
        _ => nbd.uri(volume),
    }
}

impl Live {
    /// Serves `batch`: each volume's NBD export, replication target, job
    /// device, verify entry and mirror links; a consistency group's volumes
    /// come in one batch (the cluster agent makes one unit of them).
    pub(super) fn serve(self: &Arc<Self>, batch: Vec<(OpenVolume, Listener, String)>) {
        let cx = &self.cx;
        let mut clustered = Vec::new();
        for (v, listener, uri) in batch {
            let mut exports = Exports::new([v.volume.clone()]);
            if let Some(tls) = &cx.tls {
                exports = exports.with_tls(tls.clone() as Arc<dyn blockmirror_nbd::TlsSource>);
            }
            let (sd, live) = (self.shutdown.clone(), Arc::downgrade(self));
            let name = v.volume.name().to_owned();
            self.servers.spawn(async move {
                if let Err(e) = blockmirror_nbd::serve(listener, Arc::new(exports), sd).await {
                    warn!(volume = %name, error = %e, "NBD server stopped with an error");
                    if let Some(l) = live.upgrade() {
                        l.server_error.lock().expect("poisoned").get_or_insert(e);
                    }
                }
            });
            if let Some(t) = &v.target {
                self.targets.insert(t.clone());
                if let Some(j) = &self.jobs {
                    j.add_device(DeviceConstants {
                        volume: t.name.clone(),
                        size: t.identity().size,
                        backend: t.backend.clone(),
                    });
                }
            }
            if let Some(r) = v.volume.replicator() {
                let ctx = LinkContext {
                    tls: cx.tls.clone(),
                    secret: cx.secret.clone(),
                    node: cx.config.node.clone(),
                    volume: v.volume.name().to_owned(),
                    backend: v.volume.backend().clone(),
                    locks: r.locks.clone(),
                    gen: r.gen.clone(),
                    on_peer_ahead: v.target.clone().map(|t| {
                        let vol = v.volume.clone();
                        Arc::new(move |why: String| {
                            // Host writes stop here (the role is demoting
                            // now), before the link reports back; the rest
                            // of the demote runs on its own. Not a primary:
                            // nothing.
                            let Ok(actions) = vol.role_cell().feed(Event::PeerAhead) else {
                                return;
                            };
                            let (vol, t) = (vol.clone(), t.clone());
                            tokio::spawn(async move {
                                if let Err(e) = finish_demote(&vol, &t, actions, &why).await {
                                    warn!(volume = %vol.name(), error = %e, "demote after finding a newer primary failed");
                                }
                            });
                        }) as Arc<dyn Fn(String) + Send + Sync>
                    }),
                };
                self.verify.add(VerifyVolume {
                    name: v.volume.name().to_owned(),
                    size: v.meta.get().size,
                    links: r.links.clone(),
                    ctx: ctx.clone(),
                });
                if let Some(agent) = self.cluster.get() {
                    r.gen.set_publisher(Arc::new(crate::cluster::Publisher {
                        agent: Arc::downgrade(agent),
                        volume: v.volume.name().to_owned(),
                    }));
                }
                for link in &r.links {
                    let (l, ctx, sd) = (link.clone(), ctx.clone(), self.link_stop.clone());
                    self.links.spawn(async move { l.run(ctx, sd).await });
                    let (l, sd) = (link.clone(), self.link_stop.clone());
                    self.links
                        .spawn(async move { l.persist_periodically(sd).await });
                }
            }
            clustered.push(crate::cluster::ClusterVolume {
                group: v.group.clone(),
                volume: v.volume.clone(),
                target: v.target.clone(),
                fence: v.fence.clone(),
            });
            self.served.push(Served {
                group: v.group,
                volume: v.volume,
                uri,
                target: v.target,
            });
        }
        if let Some(agent) = self.cluster.get() {
            agent.add_volumes(clustered);
        }
    }

    /// Opens and serves the volumes of `tables` (name, `[[volume]]`
    /// table), validated with the node's own config and every volume
    /// declared before them; all or none.
    pub(super) async fn open_declared(
        self: Arc<Self>,
        tables: Vec<(String, String)>,
    ) -> Result<Vec<String>, String> {
        let mut declared = self.declared.lock().await;
        if self.shutdown.is_cancelled() {
            return Err("the node is shutting down".into());
        }
        let all: String = declared
            .iter()
            .chain(&tables)
            .map(|(_, t)| t.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        let config = self
            .cx
            .config
            .with_volumes(&all)
            .map_err(|e| e.to_string())?;
        let mut batch = Vec::new();
        let mut vcs = Vec::new();
        for (name, _) in &tables {
            let vc = config
                .volume(name)
                .cloned()
                .ok_or_else(|| format!("{name}: not in its own table"))?;
            // The export's address first: a port taken fails the volume
            // before anything is opened.
            let listener = bind_addr(&vc.nbd, name).await.map_err(|e| e.to_string())?;
            let cx = self.cx.clone();
            let opened = {
                let vc = vc.clone();
                tokio::task::spawn_blocking(move || open_volume(&cx, &vc))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?
            };
            let uri = export_uri(&listener, &opened.nbd, name);
            info!(volume = %name, %uri, "serving NBD export (declared in etcd)");
            vcs.push(vc);
            batch.push((opened, listener, uri));
        }
        {
            let mut groups = self.groups.lock().expect("poisoned");
            join_groups(&mut groups, vcs.iter().zip(batch.iter().map(|(v, _, _)| v)));
        }
        self.serve(batch);
        let names = tables.iter().map(|(n, _)| n.clone()).collect();
        declared.extend(tables);
        Ok(names)
    }
}

impl crate::cluster::Host for Live {
    fn served(&self) -> Vec<(String, Option<String>)> {
        self.served
            .all()
            .iter()
            .map(|s| (s.volume.name().to_owned(), s.group.clone()))
            .collect()
    }

    fn open(
        self: Arc<Self>,
        tables: Vec<(String, String)>,
    ) -> crate::cluster::BoxFut<'static, Result<Vec<String>, String>> {
        Box::pin(self.open_declared(tables))
    }
}

impl ServedSet {
    pub(super) fn push(&self, s: Served) {
        self.list.write().expect("poisoned").push(Arc::new(s));
    }

    /// Every served volume, in the order they were opened.
    pub(super) fn all(&self) -> Vec<Arc<Served>> {
        self.list.read().expect("poisoned").clone()
    }

    pub(super) fn find(&self, name: &str) -> Option<Arc<Served>> {
        self.list
            .read()
            .expect("poisoned")
            .iter()
            .find(|s| s.volume.name() == name)
            .cloned()
    }

    pub(super) fn volumes(&self) -> Vec<Arc<Volume>> {
        self.all().iter().map(|s| s.volume.clone()).collect()
    }
}
