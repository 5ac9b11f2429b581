//! The one place a volume's role lives on this node: the pure machine of
//! [`blockmirror_core::role`] under a mutex, published in one atomic byte.
//!
//! Every role change is an event fed here ([`RoleCell::feed`]); the caller
//! performs the actions it returns (`daemon::role_driver`). Everything that
//! asks about the role (host writes, the export's read-only flag, the
//! replication receiver, the local disk) reads the published byte: one
//! atomic load, so the per-write check stays as cheap as the flag it
//! replaces, and it changes exactly when the state does.

use std::sync::atomic::{AtomicU8, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use blockmirror_core::role::{Action, Event, RoleError, RoleState};
use tracing::debug;

use crate::daemon::config::Role;

/// A volume's role (see the module docs).
pub struct RoleCell {
    volume: String,
    machine: Mutex<RoleState>,
    /// `machine.to_word()`, stored under the mutex after every transition.
    word: AtomicU8,
    /// Woken whenever the state becomes settled (a mirror or a primary).
    settled: tokio::sync::Notify,
}

impl RoleCell {
    /// A cell before the volume's record was read (`Event::Open` next).
    pub fn new(volume: &str) -> Arc<Self> {
        let s = RoleState::new();
        Arc::new(Self {
            volume: volume.to_owned(),
            machine: Mutex::new(s),
            word: AtomicU8::new(s.to_word()),
            settled: tokio::sync::Notify::new(),
        })
    }

    /// Feeds `event`: the state moves (and is published) before this
    /// returns; the actions are the caller's to perform, in order.
    pub fn feed(&self, event: Event) -> Result<Vec<Action>, RoleError> {
        let mut m = self.machine.lock().expect("poisoned");
        let before = *m;
        let actions = m.apply(event)?;
        self.word.store(m.to_word(), SeqCst);
        let (after, settled) = (*m, m.is_settled());
        drop(m);
        debug!(volume = %self.volume, %before, ?event, %after, ?actions, "role");
        crate::daemon::events::poke();
        if settled {
            self.settled.notify_waiters();
        }
        Ok(actions)
    }

    /// The state as published now.
    pub fn state(&self) -> RoleState {
        RoleState::from_word(self.word.load(SeqCst))
    }

    /// Host writes are taken (the per-write check: one atomic load).
    pub fn accepts_host_writes(&self) -> bool {
        self.state().accepts_host_writes()
    }

    /// The export is read-only by role (a mirror, or a role change under way).
    pub fn export_read_only(&self) -> bool {
        self.state().export_read_only()
    }

    /// A primary may feed the volume (it is a mirror here).
    pub fn accepts_primary(&self) -> bool {
        self.state().accepts_primary()
    }

    /// The local disk failed this run: nothing local is used.
    pub fn disk_failed(&self) -> bool {
        !self.state().serves_local_io()
    }

    /// The role as /status and the admin handlers name it.
    pub fn role(&self) -> Role {
        if self.state().status_str() == "primary" {
            Role::Primary
        } else {
            Role::Mirror
        }
    }

    /// Returns once no role change is under way.
    pub async fn settled(&self) {
        loop {
            let woken = self.settled.notified();
            if self.state().is_settled() {
                return;
            }
            woken.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockmirror_core::MirrorLabel;

    #[tokio::test]
    async fn the_state_is_published_when_feed_returns_and_waiters_wake_when_settled() {
        let cell = RoleCell::new("v");
        assert!(!cell.accepts_host_writes() && !cell.accepts_primary());
        let open = Event::Open {
            label: MirrorLabel::Consistent,
            stale_disk: false,
        };
        assert_eq!(cell.feed(open), Ok(vec![Action::ParkLinks]));
        assert!(cell.accepts_primary() && cell.export_read_only());
        assert_eq!(cell.role(), Role::Mirror);
        cell.feed(Event::Promote {
            force: false,
            fed: false,
            label: MirrorLabel::Consistent,
        })
        .unwrap();
        assert!(!cell.accepts_primary(), "refused as soon as promoting");
        let waiter = tokio::spawn({
            let cell = cell.clone();
            async move { cell.settled().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        cell.feed(Event::PromotionStored).unwrap();
        assert!(!cell.accepts_host_writes(), "not before its links started");
        cell.feed(Event::LinksStarted).unwrap();
        assert!(cell.accepts_host_writes() && !cell.export_read_only());
        assert_eq!(cell.role(), Role::Primary);
        tokio::time::timeout(std::time::Duration::from_secs(10), waiter)
            .await
            .expect("woken once settled")
            .unwrap();
        // Demoting refuses host writes at once; an illegal event changes nothing.
        cell.feed(Event::Demote).unwrap();
        assert!(!cell.accepts_host_writes() && !cell.accepts_primary());
        assert!(cell.feed(Event::Demote).is_err());
        assert_eq!(
            cell.role(),
            Role::Mirror,
            "a demoting volume shows as a mirror"
        );
    }
}
