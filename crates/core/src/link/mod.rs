//! The primary's link to one mirror as a state machine: phases, events,
//! actions. No I/O: the node's link driver (`crates/node/src/primary/link/`)
//! feeds it what happened (a connection attempt ended, the handshake judged
//! the peer, the connection failed, the catch-up finished, an operator
//! parked the link) and performs the [`Action`]s it returns (cancel the
//! connection's tasks, fail and mark the requests in flight, cut the
//! consistency group, start a catch-up, demote the volume).
//!
//! Every phase change of a link happens in [`LinkMachine::on`], in one
//! `match` over (phase, event); an event that makes no sense in a phase is a
//! typed [`IllegalEvent`]; an event about a connection that has already been
//! replaced (its epoch is older) is [`Outcome::Stale`] and changes nothing.
//!
//! ```text
//!                  Activate                 Connect
//!   Parked ───────────────────▶ Idle ─────────────────▶ Connecting
//!     ▲  (Park from any phase;   ▲ ▲ ◀── ConnectFailed ─────┘ │
//!     │   Stop from any phase    │ │                          │ Handshake(judgment)
//!     │   goes to Stopped)       │ │ ◀─ PeerAhead/SplitBrain/  ▼
//!     │                          │ │    Unrelated: fenced   Handshaking
//!     │                          │ └── DivergenceFailed ──────┘ │ DivergenceRead
//!     │                          │                              ▼   (epoch + 1)
//!     │                          ├─────── JoinFailed ────── Joining
//!     │                          │                              │ Joined
//!     │                          │          ┌───────────────────┼──────────────────┐
//!     │                          │  blank + iterative     bitmap marked      bitmap clear
//!     │                          │          ▼                   ▼                  ▼
//!     │                          │      Filling ─FillDone─▶ CatchingUp ─Done─▶ InSync
//!     │                          │                              ▲ ▲  MarkedRegions │ │
//!     │                          │                              │ └────────────────┘ │
//!     │                          │                 LagRecovered │         OverLag    │
//!     │                          │                         Inconsistent ◀────────────┘
//!     │                          │                              │
//!     │                          └──── Lost (any connected phase; epoch + 1) ◀─┘
//! ```
//!
//! What /status shows is derived, never stored beside the phase:
//! [`LinkMachine::connection`] and [`LinkMachine::sync_state`].

/// Where a link is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// The volume is a mirror on this node: the link does not connect.
    Parked,
    /// Not connected; the driver will try again (after a backoff). A fence
    /// from the last handshake is kept until a handshake says otherwise.
    Idle { fence: Option<Fence> },
    /// A connection and its handshake are being attempted.
    Connecting { fence: Option<Fence> },
    /// The handshake accepted the mirror; its divergence report is read.
    Handshaking,
    /// Connected, waiting until every member of the consistency group is.
    /// Nothing is sent yet.
    Joining,
    /// Live, filling a blank mirror iteratively: host writes only mark the
    /// bitmap (the change mask) and are copied by the passes.
    Filling,
    /// Live: host writes are sent, marked regions are being copied.
    CatchingUp,
    /// Live, nothing marked: the mirror holds every write.
    InSync,
    /// Live async link past its lag bound (lag_policy "bitmap"): writes are
    /// recorded instead of sent, so the mirror lacks some that later ones may
    /// depend on.
    Inconsistent,
    /// The node shut down. Final.
    Stopped,
}

/// Why a handshake refused to go live: nothing is copied until an operator
/// (or a role change) resolves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fence {
    /// The peer was promoted (it is ahead) or its data is unrelated.
    Suspended,
    /// Both sides were written since they last agreed.
    SplitBrain,
}

/// What the generation check of a handshake found (see `core::generation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Judgment {
    /// The primary may feed this mirror; `full_copy` when the mirror holds
    /// no lineage of ours (blank or discarded): every region is marked.
    Sync {
        full_copy: bool,
    },
    /// The mirror was promoted past us: this volume must become its mirror.
    PeerAhead,
    SplitBrain,
    /// Nothing shared, or otherwise not ours to overwrite.
    Unrelated,
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailCause {
    /// The mirror closed the link, sent an error or a nack, or the socket
    /// failed.
    Peer,
    /// A request was unanswered for longer than `mirror_timeout`.
    Timeout,
    /// A sibling in the consistency group lost its mirror: cut with it.
    Group,
}

impl FailCause {
    /// Whether the group is cut because of this failure (a group cut does
    /// not cut again).
    pub fn cuts_group(self) -> bool {
        matches!(self, FailCause::Peer | FailCause::Timeout)
    }
}

/// What happened to a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Event {
    /// The volume is a primary here (again): the link may connect.
    Activate,
    /// The volume is a mirror here now: close, stay disconnected.
    Park,
    /// The driver starts a connection attempt.
    Connect,
    /// Connecting or the handshake failed (unreachable, refused, timed out).
    ConnectFailed,
    /// The handshake succeeded and the generations were compared.
    Handshake(Judgment),
    /// The mirror's divergence report arrived: the connection is ours.
    DivergenceRead,
    /// The divergence report did not arrive.
    DivergenceFailed,
    /// Every group member is connected (or there is no group): go live.
    /// `bitmap_clear`: nothing is marked; `iterative`: initial_sync =
    /// "iterative" is configured.
    Joined {
        epoch: u64,
        bitmap_clear: bool,
        iterative: bool,
    },
    /// The group's arrival failed or the connection was cancelled meanwhile.
    JoinFailed { epoch: u64 },
    /// The connection of `epoch` failed (`None`: whatever connection there
    /// is, for a group cut).
    Lost {
        epoch: Option<u64>,
        cause: FailCause,
    },
    /// The iterative fill copied everything (or gave up and hands the rest
    /// to the live catch-up).
    FillDone { epoch: u64 },
    /// The catch-up found the bitmap clear and the mirror stored "in sync".
    CatchUpDone { epoch: u64 },
    /// Async: the lag went past its bound; writes are recorded, not sent.
    OverLag,
    /// Async: the lag is back under its bound; copy what was recorded.
    LagRecovered,
    /// Regions were marked on a link in sync (verify --mark): copy them.
    MarkedRegions,
    /// The node shuts down.
    Stop,
}

impl Event {
    /// The connection the event is about, if it names one.
    pub fn epoch(self) -> Option<u64> {
        match self {
            Event::Joined { epoch, .. }
            | Event::JoinFailed { epoch }
            | Event::FillDone { epoch }
            | Event::CatchUpDone { epoch } => Some(epoch),
            Event::Lost { epoch, .. } => epoch,
            _ => None,
        }
    }
}

/// What the driver must do, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Tell the volume's start gate that this link met its peer (once per
    /// link's life).
    ReportMet,
    /// The mirror was promoted: demote this volume (failback).
    DemoteVolume,
    /// Make the connection of `epoch` the link's (its cancel token, its
    /// sender queue once live).
    Adopt { epoch: u64 },
    /// Host writes go to the mirror from now on (install the sender queue).
    GoLive { epoch: u64 },
    /// Start copying what the bitmap marks on the connection of `epoch`.
    StartCatchUp { epoch: u64 },
    /// Cancel the current connection's tasks.
    CancelConnection,
    /// Fail every request in flight, mark its region and what the mirror
    /// acknowledged but may not have flushed.
    FailInflight,
    /// Cut the other members of the consistency group.
    CutGroup,
    /// Count (and warn about) an unexpected failure.
    CountFailure,
    /// Warn: an async mirror is past its lag bound.
    WarnInconsistent,
}

/// The result of an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The event was applied; perform these actions in order.
    Moved(Vec<Action>),
    /// The event concerned a connection that is gone; nothing changed.
    Stale,
}

/// An event that cannot happen in a phase: a driver bug, or a race the
/// driver must handle by dropping what it holds (a connection that arrived
/// after the link was parked).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("link event {event:?} is not allowed in phase {phase:?}")]
pub struct IllegalEvent {
    pub phase: Phase,
    pub event: Event,
}

/// The connection as /status spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connection {
    Connected,
    Connecting,
    Disconnected,
}

impl Connection {
    pub fn as_str(self) -> &'static str {
        match self {
            Connection::Connected => "connected",
            Connection::Connecting => "connecting",
            Connection::Disconnected => "disconnected",
        }
    }
}

/// The mirror's data state as /status spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncState {
    InSync,
    Resyncing,
    Degraded,
    /// Async with lag_policy "bitmap": writes past the lag bound were
    /// recorded instead of sent, until a resync copies them.
    Inconsistent,
    /// Automatic resync refused: the peer was promoted, or its data is
    /// unrelated. Nothing is copied.
    Suspended,
    /// Both sides were written since they last agreed.
    SplitBrain,
}

impl SyncState {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncState::InSync => "in_sync",
            SyncState::Resyncing => "resyncing",
            SyncState::Degraded => "degraded",
            SyncState::Inconsistent => "inconsistent",
            SyncState::Suspended => "suspended",
            SyncState::SplitBrain => "split_brain",
        }
    }
}

/// One link's state: its phase, its connection epoch, and what it must
/// remember across connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkMachine {
    phase: Phase,
    /// Moves on when a connection is adopted and when it ends, so events of
    /// an older connection are recognised as stale.
    epoch: u64,
    /// The mirror is (still) blank in parts: the next connection fills it
    /// from scratch (iteratively, if configured).
    scratch: bool,
    /// The start gate was told this link met its peer.
    met: bool,
}

impl LinkMachine {
    /// A link that starts disconnected (`active`) or parked.
    pub fn new(active: bool) -> Self {
        Self {
            phase: if active {
                Phase::Idle { fence: None }
            } else {
                Phase::Parked
            },
            epoch: 0,
            scratch: false,
            met: false,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// True when host writes reach the mirror (or, filling, are recorded
    /// for the running copy): the sender queue exists.
    pub fn is_live(&self) -> bool {
        matches!(
            self.phase,
            Phase::Filling | Phase::CatchingUp | Phase::InSync | Phase::Inconsistent
        )
    }

    /// True while an iterative initial sync runs: host writes only mark.
    pub fn is_filling(&self) -> bool {
        self.phase == Phase::Filling
    }

    /// True while the driver holds a connection of the current epoch
    /// (joining or live).
    pub fn has_connection(&self) -> bool {
        self.phase == Phase::Joining || self.is_live()
    }

    pub fn connection(&self) -> Connection {
        match self.phase {
            Phase::Connecting { .. } | Phase::Handshaking => Connection::Connecting,
            Phase::Joining
            | Phase::Filling
            | Phase::CatchingUp
            | Phase::InSync
            | Phase::Inconsistent => Connection::Connected,
            Phase::Parked | Phase::Idle { .. } | Phase::Stopped => Connection::Disconnected,
        }
    }

    pub fn sync_state(&self) -> SyncState {
        match self.phase {
            Phase::InSync => SyncState::InSync,
            Phase::Filling | Phase::CatchingUp => SyncState::Resyncing,
            Phase::Inconsistent => SyncState::Inconsistent,
            Phase::Idle {
                fence: Some(Fence::SplitBrain),
            }
            | Phase::Connecting {
                fence: Some(Fence::SplitBrain),
            } => SyncState::SplitBrain,
            Phase::Idle {
                fence: Some(Fence::Suspended),
            }
            | Phase::Connecting {
                fence: Some(Fence::Suspended),
            } => SyncState::Suspended,
            Phase::Parked
            | Phase::Idle { fence: None }
            | Phase::Connecting { fence: None }
            | Phase::Handshaking
            | Phase::Joining
            | Phase::Stopped => SyncState::Degraded,
        }
    }

    /// True when a read may be served by this mirror as far as its phase
    /// goes (the driver adds mode, bitmap and in-flight checks).
    pub fn in_sync(&self) -> bool {
        self.phase == Phase::InSync
    }

    /// Applies `event`. On [`IllegalEvent`] nothing changed.
    pub fn on(&mut self, event: Event) -> Result<Outcome, IllegalEvent> {
        use Action::*;
        use Event::*;
        use Phase::*;
        let illegal = IllegalEvent {
            phase: self.phase,
            event,
        };
        // Events naming a connection that is gone change nothing.
        if event.epoch().is_some_and(|e| e != self.epoch) {
            return Ok(Outcome::Stale);
        }
        let moved = |v: Vec<Action>| Ok(Outcome::Moved(v));
        match (self.phase, event) {
            (Stopped, _) => Err(illegal),
            (_, Stop) => {
                let v = self.close();
                self.phase = Stopped;
                moved(v)
            }
            (_, Park) => {
                let v = self.close();
                self.phase = Parked;
                moved(v)
            }
            (Parked, Activate) => {
                self.phase = Idle { fence: None };
                moved(vec![])
            }
            (_, Activate) => moved(vec![]),

            (Idle { fence }, Connect) => {
                self.phase = Connecting { fence };
                moved(vec![])
            }
            (Connecting { fence }, ConnectFailed) => {
                self.phase = Idle { fence };
                moved(self.report_met())
            }
            (Connecting { .. }, Handshake(j)) => match j {
                Judgment::Sync { full_copy } => {
                    self.scratch |= full_copy;
                    self.phase = Handshaking;
                    moved(vec![])
                }
                Judgment::PeerAhead => {
                    self.phase = Idle {
                        fence: Some(Fence::Suspended),
                    };
                    // Demote first: host writes are refused before the start
                    // gate lets any through.
                    let mut v = vec![DemoteVolume];
                    v.extend(self.report_met());
                    moved(v)
                }
                Judgment::SplitBrain => {
                    self.phase = Idle {
                        fence: Some(Fence::SplitBrain),
                    };
                    moved(self.report_met())
                }
                Judgment::Unrelated => {
                    self.phase = Idle {
                        fence: Some(Fence::Suspended),
                    };
                    moved(self.report_met())
                }
            },
            (Handshaking, DivergenceRead) => {
                self.epoch += 1;
                self.phase = Joining;
                moved(vec![Adopt { epoch: self.epoch }])
            }
            (Handshaking, DivergenceFailed) => {
                self.phase = Idle { fence: None };
                moved(self.report_met())
            }
            (
                Joining,
                Joined {
                    epoch,
                    bitmap_clear,
                    iterative,
                },
            ) => {
                let scratch = std::mem::take(&mut self.scratch);
                self.phase = if bitmap_clear {
                    InSync
                } else if scratch && iterative {
                    Filling
                } else {
                    CatchingUp
                };
                let mut v = vec![GoLive { epoch }];
                v.extend(self.report_met());
                // Also with nothing marked: the catch-up announces "in sync"
                // so the mirror stores our generation.
                v.push(StartCatchUp { epoch });
                moved(v)
            }
            (Joining, JoinFailed { .. }) => {
                self.phase = Idle { fence: None };
                moved(vec![])
            }
            (Joining | Filling | CatchingUp | InSync | Inconsistent, Lost { cause, .. }) => {
                let live = self.is_live();
                let mut v = self.close();
                self.phase = Idle { fence: None };
                if live {
                    if cause.cuts_group() {
                        v.push(CutGroup);
                    }
                    v.push(CountFailure);
                }
                moved(v)
            }
            // No connection to lose (a group cut names none).
            (_, Lost { epoch: None, .. }) => Ok(Outcome::Stale),

            (Filling, FillDone { .. }) => {
                self.phase = CatchingUp;
                moved(vec![])
            }
            (CatchingUp | InSync | Inconsistent, CatchUpDone { .. }) => {
                self.phase = InSync;
                moved(vec![])
            }

            (InSync, OverLag) => {
                self.phase = Inconsistent;
                moved(vec![WarnInconsistent])
            }
            (Inconsistent, LagRecovered) | (InSync, MarkedRegions) => {
                self.phase = CatchingUp;
                moved(vec![StartCatchUp { epoch: self.epoch }])
            }
            // Already recording, copying (a running catch-up picks new marks
            // up), or not live (the next connection copies them).
            (_, OverLag | LagRecovered | MarkedRegions) => moved(vec![]),

            (_, _) => Err(illegal),
        }
    }

    /// Ends whatever connection there is (for Park, Stop and Lost): what it
    /// leaves behind for the driver to clean up.
    fn close(&mut self) -> Vec<Action> {
        let mut v = Vec::new();
        if self.has_connection() {
            if self.is_filling() {
                // Still blank in parts: the next connection fills it again.
                self.scratch = true;
            }
            v.push(Action::CancelConnection);
            if self.is_live() {
                v.push(Action::FailInflight);
            }
            self.epoch += 1;
        }
        v
    }

    fn report_met(&mut self) -> Vec<Action> {
        if std::mem::replace(&mut self.met, true) {
            vec![]
        } else {
            vec![Action::ReportMet]
        }
    }
}

#[cfg(test)]
mod tests;
