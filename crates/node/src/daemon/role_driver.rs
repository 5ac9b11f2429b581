//! Performs what a volume's role machine ([`blockmirror_core::role`]) asks:
//! every role change on a running node (promote, demote, a link that found
//! its peer promoted past it, `resync --discard-local`) is an event fed to
//! the volume's [`RoleCell`](crate::volume::role::RoleCell), then this loop
//! performs the returned actions in order, and feeds each one's
//! confirmation (or failure) back, until nothing is left.
//!
//! (At start, `Node::open` performs the `Open` event's actions itself: the
//! volume is not built yet then. A failed disk's `RecordDiskFailure` is
//! performed by the disk, `LocalDisk::detach`.)

use std::collections::VecDeque;

use blockmirror_core::role::{self, Action, Event, RoleError};
use blockmirror_core::VolumeMeta;
use blockmirror_nbd::Export;
use thiserror::Error;
use tracing::warn;

use crate::mirror::receiver::MirrorTarget;
use crate::volume::meta_file;
use crate::volume::Volume;

/// Why a role change did not complete.
#[derive(Debug, Error)]
pub enum DriveError {
    /// The machine did not take the event (the state did not change).
    #[error(transparent)]
    Role(#[from] RoleError),
    /// An action failed (storing the record).
    #[error("{0}")]
    Failed(String),
}

/// One volume's role driver.
pub struct RoleDriver<'a> {
    pub volume: &'a Volume,
    pub target: Option<&'a MirrorTarget>,
}

impl RoleDriver<'_> {
    /// Feeds `event` and performs everything that follows.
    pub async fn run(&self, event: Event) -> Result<(), DriveError> {
        let actions = self.volume.role_cell().feed(event)?;
        self.perform_all(actions).await
    }

    /// Performs `actions` (what an event fed just now returned) and what
    /// their confirmations bring.
    pub async fn perform_all(&self, actions: Vec<Action>) -> Result<(), DriveError> {
        let mut todo: VecDeque<Action> = actions.into();
        while let Some(a) = todo.pop_front() {
            match self.perform(a).await {
                Ok(()) => {
                    if let Some(e) = a.done() {
                        todo.extend(self.volume.role_cell().feed(e)?);
                    }
                }
                Err(why) => {
                    if let Some(e) = a.failed() {
                        self.volume.role_cell().feed(e)?;
                    }
                    return Err(DriveError::Failed(why));
                }
            }
        }
        Ok(())
    }

    async fn perform(&self, a: Action) -> Result<(), String> {
        let v = self.volume;
        match a {
            Action::ParkLinks => {
                if let Some(r) = v.replicator() {
                    r.start_parked();
                }
            }
            Action::CutLink => {
                if let Some(t) = self.target {
                    t.cut_link();
                }
            }
            Action::StorePromotion => {
                let id = meta_file::new_generation_id().map_err(|e| e.to_string())?;
                self.store(move |m| role::promotion_record(m, id)).await?
            }
            Action::StartLinks => {
                if let Some(r) = v.replicator() {
                    r.unpark_promoted().await;
                }
            }
            Action::DrainAndParkLinks => {
                if let Some(r) = v.replicator() {
                    r.park(v.meta().size).await;
                }
            }
            Action::FlushLocal => {
                let backend = v.backend().clone();
                if let Ok(Err(e)) = tokio::task::spawn_blocking(move || backend.flush()).await {
                    warn!(volume = %v.name(), error = %e, "flushing the local disk before the demote failed");
                }
            }
            Action::StoreDemotion => self.store(role::demotion_record).await?,
            Action::StoreDiscard => self.store(role::discard_record).await?,
            Action::ForgetDiskFailure => {
                if let Some(d) = v.disk() {
                    d.forget_failure().map_err(|e| e.to_string())?;
                }
            }
            Action::RecordDiskFailure => {
                if let Some(d) = v.disk() {
                    d.ensure_marker().await?;
                }
            }
        }
        Ok(())
    }

    /// Updates the volume's record durably with `f`, on the blocking pool.
    async fn store<F>(&self, f: F) -> Result<(), String>
    where
        F: FnOnce(&mut VolumeMeta) + Send + 'static,
    {
        let cell = self.volume.meta_cell().clone();
        tokio::task::spawn_blocking(move || cell.update(f).map(|_| ()))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }
}
