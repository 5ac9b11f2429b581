//! One etcd client per member, moving to the next on failure.

use super::*;

/// The etcd members, one client each, and the one in use. A request that
/// fails moves to the next member: a balanced channel over all of them
/// kept sending some requests (and a lease's keep-alive stream) to a dead
/// member, and lost the lease with two members of three alive.
pub(super) struct Endpoints {
    urls: Vec<String>,
    clients: tokio::sync::Mutex<Vec<Option<Client>>>,
    current: std::sync::atomic::AtomicUsize,
    timeout: Duration,
}

impl Endpoints {
    pub(super) fn new(urls: &[String], timeout: Duration) -> Self {
        Self {
            urls: urls.to_vec(),
            clients: tokio::sync::Mutex::new(vec![None; urls.len()]),
            current: std::sync::atomic::AtomicUsize::new(0),
            timeout,
        }
    }

    /// The member in use (connecting on first use), or the next that
    /// connects; None if none does.
    pub(super) async fn get(&self) -> Option<(usize, Client)> {
        let n = self.urls.len();
        let start = self.current.load(Ordering::SeqCst);
        for k in 0..n {
            let i = (start + k) % n;
            if let Some(c) = self.clients.lock().await[i].clone() {
                if k > 0 {
                    self.current.store(i, Ordering::SeqCst);
                }
                return Some((i, c));
            }
            let opts = ConnectOptions::new()
                .with_connect_timeout(self.timeout)
                .with_timeout(self.timeout)
                .with_require_leader(true)
                .with_keep_alive(Duration::from_secs(1), self.timeout);
            match tokio::time::timeout(
                self.timeout * 2,
                Client::connect([&self.urls[i]], Some(opts)),
            )
            .await
            {
                Ok(Ok(c)) => {
                    info!(endpoint = %self.urls[i], "connected to etcd");
                    self.clients.lock().await[i] = Some(c.clone());
                    self.current.store(i, Ordering::SeqCst);
                    return Some((i, c));
                }
                Ok(Err(e)) => {
                    debug!(endpoint = %self.urls[i], error = %e, "cannot reach etcd member")
                }
                Err(_) => debug!(endpoint = %self.urls[i], "etcd member does not answer"),
            }
        }
        None
    }

    /// A request to member `i` failed: the next request goes to the next.
    pub(super) fn failed(&self, i: usize) {
        let n = self.urls.len();
        let _ = self
            .current
            .compare_exchange(i, (i + 1) % n, Ordering::SeqCst, Ordering::SeqCst);
    }
}
