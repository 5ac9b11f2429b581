//! The reconcile loop: for each unit (a volume or a group), what etcd holds
//! of it, the decision of `blockmirror_core::cluster`, and the action; the
//! record a primary publishes; the reports mirrors put.

use super::*;

impl Agent {
    pub(super) async fn reconcile_loop(&self, shutdown: CancellationToken) {
        let tick = (self.cfg.lease_ttl / 10).max(Duration::from_millis(100));
        let mut watch = super::PrefixWatch::default();
        // A link, role or mirror state moved here: reconcile now, so that a
        // mirror coming into step is in the record at once (until then it
        // cannot be promoted without loss).
        let mut pokes = crate::daemon::events::pokes();
        loop {
            let Some((at, mut client)) = self.client(&shutdown).await else {
                return;
            };
            watch
                .ensure(&mut client, self.keys.volumes(), self.cfg.lease_ttl)
                .await;
            for u in &self.units() {
                let r = self.reconcile(&mut client, u).await;
                if r.is_err() {
                    // Perhaps this member is down or cut off: ask the next.
                    self.etcd.failed(at);
                }
                let mut last = self.last_error.lock().expect("poisoned");
                match r {
                    // Once per distinct error, not every tick of an outage.
                    Err(e) if last.get(&u.name) != Some(&e) => {
                        warn!(unit = %u.name, error = %e, "cluster reconcile failed; retrying");
                        last.insert(u.name.clone(), e);
                    }
                    Err(e) => debug!(unit = %u.name, error = %e, "cluster reconcile failed again"),
                    Ok(()) => {
                        last.remove(&u.name);
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = watch.changed() => {}
                _ = self.kick.notified() => {}
                _ = pokes.changed() => {}
                _ = tokio::time::sleep(tick) => {}
            }
        }
    }

    /// One unit (a volume or a group): read what etcd holds of it, decide, act.
    pub(super) async fn reconcile(&self, client: &mut Client, v: &Unit) -> Result<(), String> {
        let name = v.name.as_str();
        let got = client
            .get(
                self.keys.unit(&v.base),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .map_err(|e| e.to_string())?;
        let mut record: Option<(RecordEntry, i64)> = None;
        let mut key: Option<KeyEntry> = None;
        let mut key_lease = 0;
        let mut reports = Vec::new();
        for kv in got.kvs() {
            let k = kv.key_str().map_err(|e| e.to_string())?;
            let Some(rest) = k.strip_prefix(&self.keys.unit(&v.base)) else {
                continue;
            };
            match rest {
                "record" => match decode::<RecordEntry>(kv.value()) {
                    Ok(r) => record = Some((r, kv.mod_revision())),
                    Err(e) => return Err(format!("{k}: {e}")),
                },
                "primary" => match decode::<KeyEntry>(kv.value()) {
                    Ok(e) => {
                        key_lease = kv.lease();
                        key = Some(e)
                    }
                    Err(e) => return Err(format!("{k}: {e}")),
                },
                other => {
                    if let Some(node) = other.strip_prefix("mirrors/") {
                        match decode::<ReportEntry>(kv.value()) {
                            Ok(r) => {
                                if let Some(r) = r.to_core(node) {
                                    reports.push(r);
                                }
                            }
                            Err(e) => warn!(key = k, error = %e, "unreadable mirror report"),
                        }
                    }
                }
            }
        }
        let lease = self.lease_id.load(Ordering::SeqCst);
        let primary_here = v.primary_here();
        // A mirror learns the newest epoch (and cuts an older primary).
        if let Some((r, _)) = &record {
            v.raise(r.epoch);
        }
        v.mark_synced();
        // My own report, from my state now (not what etcd has of me).
        let mine = self.local_report(v);
        reports.retain(|r| r.node != self.node);
        if let Some(m) = &mine {
            reports.push(m.clone());
            if lease != 0 {
                self.put_report(client, name, &v.base, m, lease).await?;
            }
        } else if self
            .reported
            .lock()
            .expect("poisoned")
            .remove(name)
            .is_some()
        {
            // Primary here now: it is no mirror any more.
            client
                .delete(self.keys.report(&v.base, &self.node), None)
                .await
                .map_err(|e| e.to_string())?;
        }
        if lease == 0 || !self.lease.valid() {
            return Ok(());
        }
        let core_record = match &record {
            Some((r, _)) => Some(
                r.to_core()
                    .ok_or_else(|| format!("{name}: unreadable generation in the record"))?,
            ),
            None => None,
        };
        let holds = v.holds();
        let local = decide::Local {
            node: &self.node,
            primary: primary_here,
            holds: (holds != 0).then_some(holds),
        };
        let primary_alive = match &core_record {
            Some(r) if r.primary != self.node && key.is_none() => {
                !reports.iter().any(|m| m.node == r.primary)
                    && client
                        .get(self.keys.node(&r.primary), None)
                        .await
                        .map_err(|e| e.to_string())?
                        .count()
                        > 0
            }
            _ => false,
        };
        let view = decide::View {
            record: core_record.as_ref(),
            key: key.as_ref().map(|k| (k.node.as_str(), k.epoch)),
            reports: &reports,
            primary_alive,
        };
        let decision = decide::decide(&local, &view, self.cfg.auto_promote);
        match decision {
            Decision::Stay => {
                if primary_here && holds != 0 {
                    // Publish what changed (a mirror came into step).
                    self.publish(client, v, false).await?;
                } else if let Some(k) = key.as_ref().filter(|k| {
                    primary_here && holds == 0 && k.node == self.node && key_lease == lease
                }) {
                    // The key is ours under this lease but the fence was not
                    // lifted (the publish after taking it failed): finish.
                    self.publish(client, v, true).await?;
                    info!(
                        volume = name,
                        epoch = k.epoch,
                        "cluster: primary key held; host writes acknowledged again"
                    );
                    v.hold(k.epoch);
                }
                Ok(())
            }
            Decision::Bootstrap => {
                let rec = self.new_record(v, 1, &[]);
                let txn = Txn::new()
                    .when([
                        Compare::version(self.keys.record(&v.base), CompareOp::Equal, 0),
                        Compare::version(self.keys.primary(&v.base), CompareOp::Equal, 0),
                    ])
                    .and_then(self.take_ops(&v.base, &rec, lease));
                if client
                    .txn(txn)
                    .await
                    .map_err(|e| e.to_string())?
                    .succeeded()
                {
                    info!(
                        volume = name,
                        epoch = 1,
                        "cluster: first primary of the volume"
                    );
                    self.took(v, rec);
                }
                Ok(())
            }
            Decision::Reacquire { epoch } => {
                let (old, rev) = record.clone().expect("decided on a record");
                let gen = v.generation();
                let keep: Vec<String> = if gen_hex(gen) == old.generation {
                    old.sync_mirrors.clone()
                } else {
                    Vec::new()
                };
                let mut rec = self.new_record(v, epoch, &keep);
                rec.parents = old.volumes.clone();
                if self.take(client, &v.base, &rec, rev, lease).await? {
                    info!(volume = name, epoch, "cluster: primary key taken again");
                    self.took(v, rec);
                }
                Ok(())
            }
            Decision::StepDown { by, epoch } => {
                v.release();
                self.counters.step_downs.fetch_add(1, Ordering::Relaxed);
                let why = format!("cluster: {by} holds epoch {epoch}");
                warn!(volume = name, %by, epoch, "a newer primary holds the volume: demoting here");
                let parents = record
                    .as_ref()
                    .map(|(r, _)| r.parents.clone())
                    .unwrap_or_default();
                for m in &v.members {
                    if m.volume.role() == Role::Primary {
                        if let Some(p) = parents
                            .get(m.volume.name())
                            .and_then(|g| records::parse_gen(g))
                        {
                            roll_back(m, p).await;
                        }
                        self.roles.demote(m.volume.name(), why.clone()).await?;
                    }
                }
                Ok(())
            }
            Decision::Promote { epoch, lossless } => {
                let (old, rev) = record.clone().expect("decided on a record");
                // Until this node publishes a generation of its own, the
                // old primary's other sync mirrors stay as good as it.
                let others: Vec<String> = old
                    .sync_mirrors
                    .iter()
                    .filter(|n| **n != self.node)
                    .cloned()
                    .collect();
                let mut rec = self.new_record(v, epoch, &others);
                rec.generation = old.generation.clone();
                rec.parents = old.volumes.clone();
                if !self.take(client, &v.base, &rec, rev, lease).await? {
                    return Ok(());
                }
                // What later publishes keep of this epoch (its parents).
                self.published
                    .lock()
                    .expect("poisoned")
                    .insert(name.to_owned(), rec.clone());
                let started = Instant::now();
                v.raise(epoch);
                if lossless {
                    warn!(volume = name, old = %old.primary, epoch,
                        "cluster: the primary's lease lapsed; promoting this in-step sync mirror");
                } else {
                    warn!(volume = name, old = %old.primary, epoch, published = %old.generation,
                        "cluster: the primary's lease lapsed; promoting this mirror, which may lack \
                         its last writes (auto_promote = \"any\"): that data window is given up");
                    self.counters
                        .lossy_promotions
                        .fetch_add(1, Ordering::Relaxed);
                }
                match self.roles.promote(&v.volume_names()).await {
                    Ok(msg) => {
                        self.counters.promotions.fetch_add(1, Ordering::Relaxed);
                        info!(
                            volume = name,
                            ms = started.elapsed().as_millis() as u64,
                            "{msg}"
                        );
                        self.publish(client, v, true).await?;
                        v.hold(epoch);
                        Ok(())
                    }
                    Err(e) => {
                        // Give the key back, so that another mirror may try.
                        let _ = client.delete(self.keys.primary(&v.base), None).await;
                        Err(format!("promotion failed: {e}"))
                    }
                }
            }
            Decision::NoCandidate => {
                let r = core_record.expect("decided on a record");
                let why: Vec<String> = reports
                    .iter()
                    .filter(|m| m.node != r.primary)
                    .map(|m| match decide::candidacy(&r, m, self.cfg.auto_promote) {
                        Ok(_) => format!("{}: eligible", m.node),
                        Err(e) => format!("{}: {e}", m.node),
                    })
                    .collect();
                debug!(volume = name, primary = %r.primary, mirrors = ?why,
                    "the primary's key lapsed and no mirror may be promoted automatically");
                Ok(())
            }
        }
    }

    /// The record this node would publish as primary at `epoch`.
    pub(super) fn new_record(&self, v: &Unit, epoch: u64, sync: &[String]) -> RecordEntry {
        RecordEntry {
            v: FORMAT,
            epoch,
            primary: self.node.clone(),
            generation: gen_hex(v.generation()),
            sync_mirrors: sync.to_vec(),
            volumes: v.volume_generations(),
            parents: Default::default(),
        }
    }

    pub(super) fn take_ops(&self, base: &str, rec: &RecordEntry, lease: i64) -> Vec<TxnOp> {
        let key = KeyEntry {
            v: FORMAT,
            node: self.node.clone(),
            epoch: rec.epoch,
        };
        vec![
            TxnOp::put(self.keys.record(base), encode(rec), None),
            TxnOp::put(
                self.keys.primary(base),
                encode(&key),
                Some(PutOptions::new().with_lease(lease)),
            ),
        ]
    }

    /// Takes the primary key at `rec.epoch`, if nobody holds it and the
    /// record is still the one decided on.
    pub(super) async fn take(
        &self,
        client: &mut Client,
        base: &str,
        rec: &RecordEntry,
        record_rev: i64,
        lease: i64,
    ) -> Result<bool, String> {
        let txn = Txn::new()
            .when([
                Compare::version(self.keys.primary(base), CompareOp::Equal, 0),
                Compare::mod_revision(self.keys.record(base), CompareOp::Equal, record_rev),
            ])
            .and_then(self.take_ops(base, rec, lease));
        Ok(client
            .txn(txn)
            .await
            .map_err(|e| e.to_string())?
            .succeeded())
    }

    pub(super) fn took(&self, v: &Unit, rec: RecordEntry) {
        let epoch = rec.epoch;
        self.published
            .lock()
            .expect("poisoned")
            .insert(v.name.clone(), rec);
        v.hold(epoch);
        v.published();
    }

    /// Publishes this primary's generation and sync mirrors in the record
    /// if they changed (`force`: even if not), guarded by holding the key.
    pub(super) async fn publish(
        &self,
        client: &mut Client,
        v: &Unit,
        force: bool,
    ) -> Result<(), String> {
        let _one = self.publishing.lock().await;
        self.publish_without(client, v, force, &[]).await
    }

    /// [`Agent::publish`], leaving the mirrors `exclude` out of the sync
    /// mirrors in step.
    pub(super) async fn publish_without(
        &self,
        client: &mut Client,
        v: &Unit,
        force: bool,
        exclude: &[String],
    ) -> Result<(), String> {
        let name = v.name.as_str();
        let epoch = v.holds().max(v.epoch());
        let gen = v.generation();
        let rec = RecordEntry {
            v: FORMAT,
            epoch,
            primary: self.node.clone(),
            generation: gen_hex(gen),
            sync_mirrors: v
                .in_step()
                .into_iter()
                .filter(|n| !exclude.contains(n))
                .collect(),
            volumes: v.volume_generations(),
            // The epoch's starting point stays as it was taken.
            parents: self
                .published
                .lock()
                .expect("poisoned")
                .get(name)
                .filter(|r| r.epoch == epoch)
                .map(|r| r.parents.clone())
                .unwrap_or_default(),
        };
        if !force && self.published.lock().expect("poisoned").get(name) == Some(&rec) {
            return Ok(());
        }
        let key = KeyEntry {
            v: FORMAT,
            node: self.node.clone(),
            epoch,
        };
        let txn = Txn::new()
            .when([Compare::value(
                self.keys.primary(&v.base),
                CompareOp::Equal,
                encode(&key),
            )])
            .and_then([TxnOp::put(self.keys.record(&v.base), encode(&rec), None)]);
        let ok = tokio::time::timeout(request_timeout(self.cfg.lease_ttl), client.txn(txn))
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| e.to_string())?
            .succeeded();
        if !ok {
            return Err(format!("{name}: not the holder of epoch {epoch} any more"));
        }
        debug!(volume = name, generation = %rec.generation, sync = ?rec.sync_mirrors, "record published");
        self.published
            .lock()
            .expect("poisoned")
            .insert(name.to_owned(), rec);
        let _ = gen;
        v.published();
        Ok(())
    }

    /// What this node says of its copy of `v` while it is a mirror.
    pub(super) fn local_report(&self, v: &Unit) -> Option<decide::MirrorReport> {
        v.report(&self.node)
    }

    pub(super) async fn put_report(
        &self,
        client: &mut Client,
        name: &str,
        base: &str,
        m: &decide::MirrorReport,
        lease: i64,
    ) -> Result<(), String> {
        let entry = ReportEntry {
            v: FORMAT,
            generation: gen_hex(m.generation),
            data: records::data_str(m.data).into(),
        };
        if self.reported.lock().expect("poisoned").get(name) == Some(&(lease, entry.clone())) {
            return Ok(());
        }
        client
            .put(
                self.keys.report(base, &self.node),
                encode(&entry),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await
            .map_err(|e| e.to_string())?;
        self.reported
            .lock()
            .expect("poisoned")
            .insert(name.to_owned(), (lease, entry));
        Ok(())
    }

    /// Before mirrors of `volume` switch to async: the record stops listing
    /// them as sync mirrors in step, so none of them is taken as holding
    /// every acknowledged write once it may lag. Err: the switch must not
    /// happen (this node does not hold the key, or etcd is unreachable).
    pub async fn switch_to_async(
        &self,
        volume: &str,
        nodes: &[String],
        switch: impl FnOnce(),
    ) -> Result<(), String> {
        let _one = self.publishing.lock().await;
        let Some(v) = self.unit_of(volume) else {
            return Err(format!("{volume}: not a cluster volume"));
        };
        if v.holds() != 0 {
            let Some((_, mut client)) = self.etcd.get().await else {
                return Err("no etcd member answers".into());
            };
            self.publish_without(&mut client, &v, true, nodes).await?;
        }
        // (Not the primary here: nothing is acknowledged under this node.)
        switch();
        Ok(())
    }

    /// Publishes a new generation of `volume` before any write under it is
    /// acknowledged (called by the write path through
    /// [`crate::primary::GenState`]).
    pub async fn publish_now(&self, volume: &str) -> Result<(), String> {
        let Some(v) = self.unit_of(volume) else {
            return Err(format!("{volume}: not a cluster volume"));
        };
        let Some((at, mut client)) = self.etcd.get().await else {
            return Err("no etcd member answers".into());
        };
        let r = self.publish(&mut client, &v, true).await;
        if r.is_err() {
            self.etcd.failed(at);
        }
        r
    }
}

/// A node stepping down undoes the generations it started after `parent`
/// (the one the new primary took over from) and never published: no write
/// was acknowledged under them (every acknowledgement waits for the
/// publish), and the regions written under them are still marked in its
/// links' bitmaps, which it reports to the new primary, which copies them
/// over. Without this the new primary would see a split brain.
async fn roll_back(m: &ClusterVolume, parent: u64) {
    let name = m.volume.name().to_owned();
    let cell = m.volume.meta_cell().clone();
    let before = m.volume.meta().generations;
    if before.current == parent || !before.history.contains(&parent) {
        return;
    }
    let done = tokio::task::spawn_blocking(move || {
        cell.update(|meta| {
            while meta.generations.current != parent && meta.generations.unrotate() {}
            meta.primary_at = meta.generations.current;
        })
    })
    .await;
    match done {
        Ok(Ok(after)) => warn!(volume = %name, undone = %before.to_display(),
            now = %after.generations.to_display(),
            "stepping down: generations started here after the new primary's starting point \
             were never published (no write under them was acknowledged); undone, and the \
             regions written under them are reported to the new primary to copy over"),
        Ok(Err(e)) => warn!(volume = %name, error = %e, "undoing unpublished generations failed"),
        Err(e) => warn!(volume = %name, error = %e, "undoing unpublished generations failed"),
    }
}
