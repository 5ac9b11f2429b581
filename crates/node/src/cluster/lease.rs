//! The node's lease: granted, kept alive, granted again when lost; every
//! volume's fence released when it lapses.

use super::*;

impl Agent {
    /// Grants the lease, keeps it alive, grants a new one when it is lost.
    pub(super) async fn keep_lease(&self, shutdown: CancellationToken) {
        let ttl = self.cfg.lease_ttl;
        let timeout = request_timeout(ttl);
        let every = ttl / 3;
        'grant: while !shutdown.is_cancelled() {
            let Some((mut at, mut client)) = self.client(&shutdown).await else {
                return;
            };
            let sent = Instant::now();
            let granted =
                tokio::time::timeout(timeout, client.lease_grant(self.ttl_secs(), None)).await;
            let id = match granted {
                Ok(Ok(r)) if r.ttl() > 0 => {
                    self.lease
                        .renewed(sent, Duration::from_secs(r.ttl() as u64));
                    r.id()
                }
                other => {
                    self.connected.store(false, Ordering::Relaxed);
                    self.etcd.failed(at);
                    debug!(result = ?other.map(|r| r.map(|_| ())), "lease grant failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(200)) => continue 'grant,
                    }
                }
            };
            self.connected.store(true, Ordering::Relaxed);
            self.lease_id.store(id, Ordering::SeqCst);
            let put = client
                .put(
                    self.keys.node(&self.node),
                    encode(&self.entry),
                    Some(PutOptions::new().with_lease(id)),
                )
                .await;
            if let Err(e) = put {
                warn!(error = %e, "registering the node in etcd failed");
            }
            // The address book of declared volumes (no lease: a node that
            // is down is still their peer).
            if let Err(e) = client
                .put(self.keys.member(&self.node), encode(&self.entry), None)
                .await
            {
                warn!(error = %e, "registering the node's address in etcd failed");
            }
            info!(
                lease = format!("{id:x}"),
                ttl_ms = ttl.as_millis() as u64,
                "cluster lease granted"
            );
            self.kick.notify_one();
            // Keep it alive: one keep-alive every ttl/3; the answer to each
            // renews the clock from when it was sent.
            let mut stream = None;
            loop {
                if stream.is_none() {
                    // Another member than the one that failed, if any.
                    if let Some((i, c)) = self.etcd.get().await {
                        (at, client) = (i, c);
                    }
                    match tokio::time::timeout(timeout, client.lease_keep_alive(id)).await {
                        Ok(Ok(s)) => stream = Some(s),
                        _ => {
                            self.connected.store(false, Ordering::Relaxed);
                            self.etcd.failed(at);
                        }
                    }
                }
                if let Some((keeper, answers)) = &mut stream {
                    let sent = Instant::now();
                    let answered = tokio::time::timeout(timeout, async {
                        keeper.keep_alive().await?;
                        answers.message().await
                    })
                    .await;
                    match answered {
                        Ok(Ok(Some(r))) if r.ttl() > 0 => {
                            self.connected.store(true, Ordering::Relaxed);
                            self.lease
                                .renewed(sent, Duration::from_secs(r.ttl() as u64));
                        }
                        Ok(Ok(Some(_))) => {
                            warn!(
                                lease = format!("{id:x}"),
                                "the cluster lease expired in etcd"
                            );
                            break;
                        }
                        _ => {
                            self.connected.store(false, Ordering::Relaxed);
                            self.etcd.failed(at);
                            stream = None;
                        }
                    }
                }
                if !self.lease.valid() {
                    break;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(if stream.is_some() { every } else { Duration::from_millis(100) }) => {}
                }
            }
            // Lost: every key under it is gone (or soon will be); nothing
            // here acknowledges a write any more.
            self.lease.expire();
            self.lease_id.store(0, Ordering::SeqCst);
            self.counters.lease_losses.fetch_add(1, Ordering::Relaxed);
            for v in &self.volumes() {
                if v.fence.holds() != 0 {
                    warn!(volume = %v.volume.name(), epoch = v.fence.holds(),
                        "cluster lease not renewed in time: host writes are no longer acknowledged here");
                }
                v.fence.release();
            }
            self.kick.notify_one();
        }
    }
}
