//! A volume's role on its node (primary, mirror, and the steps between) as
//! one pure state machine: events in ([`RoleState::apply`]), actions out
//! (what the node must do, in order), and the questions the I/O paths ask
//! ([`RoleState::accepts_host_writes`] and friends), answered from the state
//! alone.
//!
//! ```text
//!            Open{label: none}                          Open{label: some, or a stale disk}
//!   Opening ──────────────────▶ Primary        Opening ──────────────────▶ Mirror
//!
//!             Promote              PromotionStored              LinksStarted
//!   Mirror ───────────▶ Promoting ────────────────▶ Promoting ─────────────▶ Primary
//!    ▲ ▲ │ DiscardLocal (Storing)                   (Starting)                │ │
//!    │ │ └──▶ Mirror      │ PromotionFailed                                   │ │ LocalDiskFailed:
//!    │ └──────────────────┘                                                   │ └▶ Primary, disk
//!    │                                                                        │    failed (sticky)
//!    │      DemotionStored | DemotionFailed        Demote | PeerAhead |       │
//!    └─────────────────────────────── Demoting ◀──────────────────────────────┘
//!                                    {discard}          DiscardLocal
//!
//!   state + event                        next state              actions, in order
//!   Opening + Open{none}                 Primary                 -
//!   Opening + Open{some}                 Mirror                  ParkLinks
//!   Opening + Open{stale disk}           Mirror                  StoreDiscard, ForgetDiskFailure, ParkLinks
//!   Mirror + Promote                     Promoting(Storing)      CutLink, StorePromotion
//!     (refused: fed, or inconsistent, without force)
//!   Promoting(Storing) + PromotionStored Promoting(Starting)     StartLinks
//!   Promoting(Storing) + PromotionFailed Mirror                  -
//!   Promoting(Starting) + LinksStarted   Primary                 -
//!   Primary + Demote | PeerAhead         Demoting{discard: no}   DrainAndParkLinks, FlushLocal, StoreDemotion
//!   Primary + DiscardLocal               Demoting{discard: yes}  DrainAndParkLinks, FlushLocal, StoreDemotion
//!   Demoting{discard: no} + DemotionStored   Mirror              -
//!   Demoting{discard: yes} + DemotionStored  Mirror              StoreDiscard, CutLink
//!   Demoting + DemotionFailed            Mirror                  -
//!   Mirror + DiscardLocal                Mirror                  StoreDiscard, CutLink
//!   Primary + LocalDiskFailed            Primary, disk failed    RecordDiskFailure (the first time)
//!   anything else                        unchanged               RoleError::Illegal{state, event}
//! ```
//!
//! In words: a volume opens as a primary when its record has no mirror
//! label, as a mirror otherwise (a disk marked failed in an earlier run is
//! stale: its record is discarded first, so it comes back blank). A mirror
//! is promoted in two steps, each confirmed by the driver: the new
//! generation is stored, then its links are started; only then does it take
//! host writes. A primary is demoted (by an operator, by a link that found
//! its peer promoted past it, or by `resync --discard-local`) in one step
//! the driver confirms once host writes drained, the mirrors were flushed
//! and the record says "consistent".
//!
//! What is **not** an action: whether host writes are accepted, whether the
//! export is read-only, whether a primary may feed the volume, whether the
//! local disk is used. Those are read from the state
//! ([`RoleState::to_word`] packs it in one byte for an atomic fast path), so
//! they change exactly when the state does: a volume that starts demoting
//! refuses the next host write before [`RoleState::apply`] returns.
//!
//! The local disk's health is a second, sticky dimension of the state: once
//! failed (`on_primary_failure = "serve_from_mirror"`) it stays failed for
//! the run, whatever role follows; the next start finds its marker and makes
//! the volume a blank mirror.
//!
//! Generation rules (see [`crate::generation`]), as the record functions
//! the driver applies when it performs the store actions:
//! [`promotion_record`] starts a new generation whose history names the old
//! one (`promoted_from`); [`demotion_record`] labels a demoted primary
//! consistent, keeping `primary_at` so that its own writes are reported to
//! the next primary; [`discard_record`] drops the lineage. A volume is
//! Primary for one generation at a time, the current one: promotion is
//! refused unless it is a mirror, and while it is Primary its record says
//! `primary_at == current`.

use std::fmt;

use thiserror::Error;

use crate::meta::{MirrorLabel, VolumeMeta};

/// A volume's role on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Before the record was read: nothing is served.
    Opening,
    /// Fed by a primary; the export is read-only; its own links are parked.
    Mirror,
    /// Becoming the primary; host writes and primaries are refused.
    Promoting(PromoteStage),
    /// Takes host writes and replicates them to its mirrors.
    Primary,
    /// Becoming a mirror: host writes are refused, those in progress drain.
    /// With `discard`, the local data is then thrown away (`resync
    /// --discard-local`).
    Demoting { discard: bool },
}

/// Where a promotion is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PromoteStage {
    /// The new generation is being stored.
    Storing,
    /// Stored; the links to this volume's own mirrors are being started.
    Starting,
}

/// The local disk's health (sticky: failed stays failed for the run).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Disk {
    Ok,
    /// Detached (`serve_from_mirror`): nothing local is read or written.
    Failed,
}

/// The whole state: role and disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RoleState {
    pub role: Role,
    pub disk: Disk,
}

/// What moves the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The volume's record was read: `label` is its mirror label (none: it
    /// was a primary); `stale_disk`: its disk was marked failed in an
    /// earlier run.
    Open {
        label: MirrorLabel,
        stale_disk: bool,
    },
    /// An operator promotes the volume. `fed`: a primary is feeding it now;
    /// `label`: its record's mirror label. Without `force`, a fed or
    /// inconsistent mirror is not promoted.
    Promote {
        force: bool,
        fed: bool,
        label: MirrorLabel,
    },
    /// The driver stored the promotion's record.
    PromotionStored,
    /// Storing the promotion's record failed: still a mirror.
    PromotionFailed,
    /// The driver started the links to this volume's own mirrors.
    LinksStarted,
    /// An operator demotes the volume.
    Demote,
    /// A link found its mirror holding a newer generation (it was promoted
    /// while this node was away): this side becomes its mirror.
    PeerAhead,
    /// `resync --discard-local`: this side gives up its data.
    DiscardLocal,
    /// The driver drained host writes, flushed and parked the links, flushed
    /// the local disk and stored the demoted record.
    DemotionStored,
    /// Storing the demoted record failed: a mirror for this run anyway (its
    /// writes drained, its links parked).
    DemotionFailed,
    /// A local I/O failed and the disk is to be detached
    /// (`serve_from_mirror`).
    LocalDiskFailed,
}

/// An [`Event`] without its data, to name it in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    Open,
    Promote,
    PromotionStored,
    PromotionFailed,
    LinksStarted,
    Demote,
    PeerAhead,
    DiscardLocal,
    DemotionStored,
    DemotionFailed,
    LocalDiskFailed,
}

/// What the driver must do, in the order given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Keep the links to this volume's own mirrors dormant (at open).
    ParkLinks,
    /// End the replication link feeding this volume now, if any.
    CutLink,
    /// Store [`promotion_record`] with a fresh generation id; then feed
    /// [`Event::PromotionStored`] (or [`Event::PromotionFailed`]).
    StorePromotion,
    /// Reset every link's bitmap (from now on it records this primary's
    /// writes), store them, open the start gate and wake the links; then
    /// feed [`Event::LinksStarted`].
    StartLinks,
    /// Wait for the host writes in progress, FLUSH every live mirror, park
    /// the links and store their bitmaps.
    DrainAndParkLinks,
    /// Make the local disk durable.
    FlushLocal,
    /// Store [`demotion_record`]; then feed [`Event::DemotionStored`] (or
    /// [`Event::DemotionFailed`]).
    StoreDemotion,
    /// Store [`discard_record`].
    StoreDiscard,
    /// Remove the disk-failed marker of an earlier run (after the discarded
    /// record is durable).
    ForgetDiskFailure,
    /// Record the failed disk durably before anything is served from a
    /// mirror.
    RecordDiskFailure,
}

/// Why an event was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum RoleError {
    #[error("{event} is not possible while the volume is {state}")]
    Illegal { state: RoleState, event: EventKind },
    #[error("promote refused: a primary is feeding the volume (force overrides)")]
    Fed,
    #[error("promote refused: the volume's data is inconsistent (force overrides)")]
    Inconsistent,
}

impl Event {
    pub fn kind(&self) -> EventKind {
        match self {
            Event::Open { .. } => EventKind::Open,
            Event::Promote { .. } => EventKind::Promote,
            Event::PromotionStored => EventKind::PromotionStored,
            Event::PromotionFailed => EventKind::PromotionFailed,
            Event::LinksStarted => EventKind::LinksStarted,
            Event::Demote => EventKind::Demote,
            Event::PeerAhead => EventKind::PeerAhead,
            Event::DiscardLocal => EventKind::DiscardLocal,
            Event::DemotionStored => EventKind::DemotionStored,
            Event::DemotionFailed => EventKind::DemotionFailed,
            Event::LocalDiskFailed => EventKind::LocalDiskFailed,
        }
    }
}

impl Action {
    /// The event the driver feeds once it performed this action (None:
    /// nothing waits for it).
    pub fn done(self) -> Option<Event> {
        match self {
            Action::StorePromotion => Some(Event::PromotionStored),
            Action::StartLinks => Some(Event::LinksStarted),
            Action::StoreDemotion => Some(Event::DemotionStored),
            _ => None,
        }
    }

    /// The event the driver feeds when this action failed (None: the
    /// failure is only reported).
    pub fn failed(self) -> Option<Event> {
        match self {
            Action::StorePromotion => Some(Event::PromotionFailed),
            Action::StoreDemotion => Some(Event::DemotionFailed),
            _ => None,
        }
    }
}

impl Default for RoleState {
    fn default() -> Self {
        Self::new()
    }
}

impl RoleState {
    /// Before the record was read.
    pub const fn new() -> Self {
        Self {
            role: Role::Opening,
            disk: Disk::Ok,
        }
    }

    /// Takes `event`: the new state, and what the driver must do now, in
    /// order. An event the state does not take changes nothing.
    pub fn apply(&mut self, event: Event) -> Result<Vec<Action>, RoleError> {
        use Action::*;
        let illegal = RoleError::Illegal {
            state: *self,
            event: event.kind(),
        };
        let (role, actions) = match (self.role, event) {
            (Role::Opening, Event::Open { label, stale_disk }) => {
                let stale = if stale_disk {
                    vec![StoreDiscard, ForgetDiskFailure]
                } else {
                    vec![]
                };
                if label == MirrorLabel::None && !stale_disk {
                    (Role::Primary, stale)
                } else {
                    (Role::Mirror, [stale, vec![ParkLinks]].concat())
                }
            }
            (Role::Mirror, Event::Promote { force, fed, label }) => {
                if fed && !force {
                    return Err(RoleError::Fed);
                }
                if label == MirrorLabel::Inconsistent && !force {
                    return Err(RoleError::Inconsistent);
                }
                (
                    Role::Promoting(PromoteStage::Storing),
                    vec![CutLink, StorePromotion],
                )
            }
            (Role::Promoting(PromoteStage::Storing), Event::PromotionStored) => {
                (Role::Promoting(PromoteStage::Starting), vec![StartLinks])
            }
            (Role::Promoting(PromoteStage::Storing), Event::PromotionFailed) => {
                (Role::Mirror, vec![])
            }
            (Role::Promoting(PromoteStage::Starting), Event::LinksStarted) => {
                (Role::Primary, vec![])
            }
            (Role::Primary, Event::Demote | Event::PeerAhead | Event::DiscardLocal) => (
                Role::Demoting {
                    discard: event == Event::DiscardLocal,
                },
                vec![DrainAndParkLinks, FlushLocal, StoreDemotion],
            ),
            (Role::Demoting { discard }, Event::DemotionStored) => (
                Role::Mirror,
                if discard {
                    vec![StoreDiscard, CutLink]
                } else {
                    vec![]
                },
            ),
            (Role::Demoting { .. }, Event::DemotionFailed) => (Role::Mirror, vec![]),
            (Role::Mirror, Event::DiscardLocal) => (Role::Mirror, vec![StoreDiscard, CutLink]),
            (Role::Primary, Event::LocalDiskFailed) => {
                let first = self.disk == Disk::Ok;
                self.disk = Disk::Failed;
                (
                    Role::Primary,
                    if first {
                        vec![RecordDiskFailure]
                    } else {
                        vec![]
                    },
                )
            }
            (
                Role::Opening
                | Role::Mirror
                | Role::Promoting(_)
                | Role::Primary
                | Role::Demoting { .. },
                _,
            ) => return Err(illegal),
        };
        self.role = role;
        Ok(actions)
    }

    /// Host writes (and trims, zeroes) are taken: only as the primary.
    pub fn accepts_host_writes(&self) -> bool {
        self.role == Role::Primary
    }

    /// The export is read-only: everywhere but as the primary.
    pub fn export_read_only(&self) -> bool {
        !self.accepts_host_writes()
    }

    /// A primary may feed the volume: only as a mirror.
    pub fn accepts_primary(&self) -> bool {
        self.role == Role::Mirror
    }

    /// The local disk is read and written (it has not failed this run).
    pub fn serves_local_io(&self) -> bool {
        self.disk == Disk::Ok
    }

    /// No role change is under way (a mirror or a primary).
    pub fn is_settled(&self) -> bool {
        matches!(self.role, Role::Mirror | Role::Primary)
    }

    /// `primary` or `mirror`, as /status names the role: a volume that is
    /// promoting is not a primary yet, one that is demoting is no longer.
    pub fn status_str(&self) -> &'static str {
        if self.role == Role::Primary {
            "primary"
        } else {
            "mirror"
        }
    }

    /// The state in one byte, for an atomic fast path ([`Self::from_word`]).
    pub fn to_word(&self) -> u8 {
        let role = match self.role {
            Role::Opening => 0,
            Role::Mirror => 1,
            Role::Promoting(PromoteStage::Storing) => 2,
            Role::Promoting(PromoteStage::Starting) => 3,
            Role::Primary => 4,
            Role::Demoting { discard: false } => 5,
            Role::Demoting { discard: true } => 6,
        };
        role | if self.disk == Disk::Failed { 0x80 } else { 0 }
    }

    /// The state [`Self::to_word`] packed (an unknown role reads as Opening).
    pub fn from_word(w: u8) -> Self {
        let role = match w & 0x7f {
            1 => Role::Mirror,
            2 => Role::Promoting(PromoteStage::Storing),
            3 => Role::Promoting(PromoteStage::Starting),
            4 => Role::Primary,
            5 => Role::Demoting { discard: false },
            6 => Role::Demoting { discard: true },
            _ => Role::Opening,
        };
        let disk = if w & 0x80 != 0 {
            Disk::Failed
        } else {
            Disk::Ok
        };
        Self { role, disk }
    }
}

/// The record of a promotion with fresh id `id`: a new generation whose
/// history names the old one, which is remembered as `promoted_from`; this
/// node is primary at the new one; no mirror label.
pub fn promotion_record(m: &mut VolumeMeta, id: u64) {
    m.promoted_from = m.generations.current;
    m.generations.rotate(id);
    m.primary_at = m.generations.current;
    m.label = MirrorLabel::None;
}

/// The record of a demoted primary: consistent (what it holds is a point in
/// time of its lineage). The generation and `primary_at` stay: its own
/// writes of that generation are what it reports to the next primary.
pub fn demotion_record(m: &mut VolumeMeta) {
    if m.label == MirrorLabel::None {
        m.label = MirrorLabel::Consistent;
    }
}

/// The record of a volume whose data is thrown away: blank (a primary copies
/// the whole volume to it) and inconsistent until that copy completes.
pub fn discard_record(m: &mut VolumeMeta) {
    m.generations.discard();
    m.label = MirrorLabel::Inconsistent;
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Opening => "opening",
            Role::Mirror => "a mirror",
            Role::Promoting(PromoteStage::Storing) => "promoting (storing the new generation)",
            Role::Promoting(PromoteStage::Starting) => "promoting (starting its links)",
            Role::Primary => "the primary",
            Role::Demoting { discard: false } => "demoting",
            Role::Demoting { discard: true } => "demoting to discard its data",
        })
    }
}

impl fmt::Display for RoleState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.role)?;
        if self.disk == Disk::Failed {
            f.write_str(" (local disk failed)")?;
        }
        Ok(())
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EventKind::Open => "open",
            EventKind::Promote => "promote",
            EventKind::PromotionStored => "promotion stored",
            EventKind::PromotionFailed => "promotion failed",
            EventKind::LinksStarted => "links started",
            EventKind::Demote => "demote",
            EventKind::PeerAhead => "peer ahead",
            EventKind::DiscardLocal => "discard local",
            EventKind::DemotionStored => "demotion stored",
            EventKind::DemotionFailed => "demotion failed",
            EventKind::LocalDiskFailed => "local disk failed",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generation::Generations;
    use proptest::prelude::*;
    use Action::*;

    const ROLES: [Role; 7] = [
        Role::Opening,
        Role::Mirror,
        Role::Promoting(PromoteStage::Storing),
        Role::Promoting(PromoteStage::Starting),
        Role::Primary,
        Role::Demoting { discard: false },
        Role::Demoting { discard: true },
    ];

    const LABELS: [MirrorLabel; 4] = [
        MirrorLabel::None,
        MirrorLabel::InSync,
        MirrorLabel::Consistent,
        MirrorLabel::Inconsistent,
    ];

    /// Every event, with every value of its data.
    fn all_events() -> Vec<Event> {
        let mut v = Vec::new();
        for label in LABELS {
            for stale_disk in [false, true] {
                v.push(Event::Open { label, stale_disk });
            }
            for force in [false, true] {
                for fed in [false, true] {
                    v.push(Event::Promote { force, fed, label });
                }
            }
        }
        v.extend([
            Event::PromotionStored,
            Event::PromotionFailed,
            Event::LinksStarted,
            Event::Demote,
            Event::PeerAhead,
            Event::DiscardLocal,
            Event::DemotionStored,
            Event::DemotionFailed,
            Event::LocalDiskFailed,
        ]);
        v
    }

    /// The documented transitions, written out again: `None` where the
    /// event is illegal in that role.
    fn expected(
        role: Role,
        disk: Disk,
        e: Event,
    ) -> Option<Result<(Role, Vec<Action>), RoleError>> {
        let demoting = |discard| {
            Ok((
                Role::Demoting { discard },
                vec![DrainAndParkLinks, FlushLocal, StoreDemotion],
            ))
        };
        Some(match (role, e) {
            (Role::Opening, Event::Open { label, stale_disk }) => match (label, stale_disk) {
                (MirrorLabel::None, false) => Ok((Role::Primary, vec![])),
                (_, false) => Ok((Role::Mirror, vec![ParkLinks])),
                (_, true) => Ok((
                    Role::Mirror,
                    vec![StoreDiscard, ForgetDiskFailure, ParkLinks],
                )),
            },
            (Role::Mirror, Event::Promote { force, fed, label }) => {
                if fed && !force {
                    Err(RoleError::Fed)
                } else if label == MirrorLabel::Inconsistent && !force {
                    Err(RoleError::Inconsistent)
                } else {
                    Ok((
                        Role::Promoting(PromoteStage::Storing),
                        vec![CutLink, StorePromotion],
                    ))
                }
            }
            (Role::Promoting(PromoteStage::Storing), Event::PromotionStored) => {
                Ok((Role::Promoting(PromoteStage::Starting), vec![StartLinks]))
            }
            (Role::Promoting(PromoteStage::Storing), Event::PromotionFailed) => {
                Ok((Role::Mirror, vec![]))
            }
            (Role::Promoting(PromoteStage::Starting), Event::LinksStarted) => {
                Ok((Role::Primary, vec![]))
            }
            (Role::Primary, Event::Demote | Event::PeerAhead) => demoting(false),
            (Role::Primary, Event::DiscardLocal) => demoting(true),
            (Role::Primary, Event::LocalDiskFailed) => Ok((
                Role::Primary,
                if disk == Disk::Ok {
                    vec![RecordDiskFailure]
                } else {
                    vec![]
                },
            )),
            (Role::Demoting { discard: false }, Event::DemotionStored) => {
                Ok((Role::Mirror, vec![]))
            }
            (Role::Demoting { discard: true }, Event::DemotionStored) => {
                Ok((Role::Mirror, vec![StoreDiscard, CutLink]))
            }
            (Role::Demoting { .. }, Event::DemotionFailed) => Ok((Role::Mirror, vec![])),
            (Role::Mirror, Event::DiscardLocal) => Ok((Role::Mirror, vec![StoreDiscard, CutLink])),
            _ => return None,
        })
    }

    /// Every event in every state: the documented transition, or the typed
    /// error naming the state and the event (and then nothing changes).
    #[test]
    fn every_event_in_every_state() {
        let mut legal = 0;
        for role in ROLES {
            for disk in [Disk::Ok, Disk::Failed] {
                for e in all_events() {
                    let before = RoleState { role, disk };
                    let mut s = before;
                    let got = s.apply(e);
                    match expected(role, disk, e) {
                        Some(Ok((next, actions))) => {
                            legal += 1;
                            assert_eq!(got, Ok(actions), "{before} + {e:?}");
                            assert_eq!(s.role, next, "{before} + {e:?}");
                            let disk_after = if e == Event::LocalDiskFailed {
                                Disk::Failed
                            } else {
                                disk
                            };
                            assert_eq!(s.disk, disk_after, "{before} + {e:?}");
                        }
                        Some(Err(refusal)) => {
                            assert_eq!(got, Err(refusal), "{before} + {e:?}");
                            assert_eq!(s, before, "a refused event changes nothing");
                        }
                        None => {
                            assert_eq!(
                                got,
                                Err(RoleError::Illegal {
                                    state: before,
                                    event: e.kind()
                                }),
                                "{before} + {e:?}"
                            );
                            assert_eq!(s, before, "an illegal event changes nothing");
                        }
                    }
                }
            }
        }
        assert!(legal > 20, "{legal}");
    }

    #[test]
    fn errors_name_the_state_and_the_event() {
        let mut s = RoleState {
            role: Role::Primary,
            disk: Disk::Failed,
        };
        let e = s
            .apply(Event::Promote {
                force: true,
                fed: false,
                label: MirrorLabel::None,
            })
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "promote is not possible while the volume is the primary (local disk failed)"
        );
        let mut m = RoleState {
            role: Role::Mirror,
            disk: Disk::Ok,
        };
        assert_eq!(
            m.apply(Event::PeerAhead).unwrap_err().to_string(),
            "peer ahead is not possible while the volume is a mirror"
        );
    }

    #[test]
    fn words_roundtrip() {
        for role in ROLES {
            for disk in [Disk::Ok, Disk::Failed] {
                let s = RoleState { role, disk };
                assert_eq!(RoleState::from_word(s.to_word()), s);
            }
        }
        assert_eq!(RoleState::from_word(0x7f), RoleState::new());
    }

    #[test]
    fn a_failover_and_failback_story() {
        // Node A: primary; node B: its mirror.
        let (mut a, mut b) = (RoleState::new(), RoleState::new());
        let mut ma = VolumeMeta::new([1; 16], 4096, 10);
        let mut mb = VolumeMeta::new_mirror([1; 16], 4096);
        a.apply(Event::Open {
            label: ma.label,
            stale_disk: false,
        })
        .unwrap();
        assert_eq!(
            b.apply(Event::Open {
                label: mb.label,
                stale_disk: false
            }),
            Ok(vec![ParkLinks])
        );
        // B catches up: it adopts A's record.
        mb.generations = ma.generations;
        mb.label = MirrorLabel::InSync;
        // A vanishes; B is promoted.
        assert_eq!(
            b.apply(Event::Promote {
                force: false,
                fed: false,
                label: mb.label
            }),
            Ok(vec![CutLink, StorePromotion])
        );
        assert!(!b.accepts_host_writes() && !b.accepts_primary());
        promotion_record(&mut mb, 20);
        assert_eq!(b.apply(Event::PromotionStored), Ok(vec![StartLinks]));
        assert!(!b.accepts_host_writes(), "not before its links started");
        b.apply(Event::LinksStarted).unwrap();
        assert!(b.accepts_host_writes());
        assert_eq!(mb.promoted_from, 10);
        assert_eq!(mb.generations.history[0], 10);
        assert_eq!(
            crate::generation::compare(&ma.generations, &mb.generations),
            crate::generation::Relation::PeerAhead
        );
        // A returns, its link finds B ahead: A demotes itself.
        assert_eq!(
            a.apply(Event::PeerAhead),
            Ok(vec![DrainAndParkLinks, FlushLocal, StoreDemotion])
        );
        assert!(!a.accepts_host_writes() && !a.accepts_primary());
        demotion_record(&mut ma);
        a.apply(Event::DemotionStored).unwrap();
        assert!(a.accepts_primary());
        assert_eq!(ma.label, MirrorLabel::Consistent);
        assert_eq!(
            ma.primary_at, ma.generations.current,
            "reports its own writes"
        );
    }

    /// A driver that feeds back each action's `done` (or `failed`) event
    /// always ends in a settled state.
    #[test]
    fn confirming_every_action_settles() {
        for label in LABELS {
            for ok in [true, false] {
                let mut s = RoleState::new();
                let mut todo = s
                    .apply(Event::Open {
                        label,
                        stale_disk: false,
                    })
                    .unwrap();
                let mut events = vec![
                    Event::Promote {
                        force: true,
                        fed: false,
                        label,
                    },
                    Event::Demote,
                    Event::DiscardLocal,
                ];
                events.reverse();
                loop {
                    while !todo.is_empty() {
                        let a = todo.remove(0);
                        let next = if ok { a.done() } else { a.failed() };
                        if let Some(e) = next {
                            todo.extend(s.apply(e).unwrap());
                        }
                    }
                    assert!(s.is_settled(), "{s}");
                    let Some(e) = events.pop() else { break };
                    todo = s.apply(e).unwrap_or_default();
                }
            }
        }
    }

    /// What the property test drives: the machine's events, plus what
    /// changes the record outside the machine.
    #[derive(Debug, Clone, Copy)]
    enum Step {
        Event(Event),
        /// A primary's write that a mirror misses starts a new generation
        /// (`GenState::diverge`).
        Rotate,
        /// A mirror's resync completes: it adopts its primary's record.
        Synced,
        /// A mirror's resync starts.
        Resyncing,
    }

    fn steps() -> impl Strategy<Value = Vec<Step>> {
        let label = prop_oneof![
            Just(MirrorLabel::None),
            Just(MirrorLabel::InSync),
            Just(MirrorLabel::Consistent),
            Just(MirrorLabel::Inconsistent),
        ];
        let event = prop_oneof![
            (label, any::<bool>())
                .prop_map(|(label, stale_disk)| Event::Open { label, stale_disk }),
            // A real Promote carries the record's label: see the test.
            (any::<bool>(), any::<bool>()).prop_map(|(force, fed)| Event::Promote {
                force,
                fed,
                label: MirrorLabel::None
            }),
            Just(Event::PromotionStored),
            Just(Event::PromotionFailed),
            Just(Event::LinksStarted),
            Just(Event::Demote),
            Just(Event::PeerAhead),
            Just(Event::DiscardLocal),
            Just(Event::DemotionStored),
            Just(Event::DemotionFailed),
            Just(Event::LocalDiskFailed),
        ];
        proptest::collection::vec(
            prop_oneof![
                8 => event.prop_map(Step::Event),
                1 => Just(Step::Rotate),
                1 => Just(Step::Synced),
                1 => Just(Step::Resyncing),
            ],
            0..60,
        )
    }

    fn ids(g: &Generations) -> Vec<u64> {
        std::iter::once(g.current)
            .chain(g.history)
            .filter(|&x| x != 0)
            .collect()
    }

    proptest! {
        /// Random events against the machine and a model of the record the
        /// driver keeps (every store action applied with the record rules).
        #[test]
        fn invariants_hold_under_any_sequence(steps in steps(), primary_at_start in any::<bool>()) {
            let mut s = RoleState::new();
            let mut m = if primary_at_start {
                VolumeMeta::new([2; 16], 4096, 1)
            } else {
                VolumeMeta::new_mirror([2; 16], 4096)
            };
            let mut next_id = 100u64;
            let mut ever_failed = false;
            for step in steps {
                let before = s;
                let e = match step {
                    Step::Event(Event::Open { stale_disk, .. }) => Event::Open { label: m.label, stale_disk },
                    Step::Event(Event::Promote { force, fed, .. }) => Event::Promote { force, fed, label: m.label },
                    Step::Event(e) => e,
                    Step::Rotate => {
                        // Only a volume taking (or draining) host writes rotates.
                        if matches!(s.role, Role::Primary | Role::Demoting { .. }) {
                            next_id += 1;
                            m.generations.rotate(next_id);
                            m.primary_at = m.generations.current;
                        }
                        continue;
                    }
                    Step::Synced => {
                        if s.accepts_primary() {
                            next_id += 1;
                            m.generations = Generations::fresh(next_id);
                            m.label = MirrorLabel::InSync;
                        }
                        continue;
                    }
                    Step::Resyncing => {
                        if s.accepts_primary() {
                            m.label = MirrorLabel::Inconsistent;
                        }
                        continue;
                    }
                };
                let Ok(actions) = s.apply(e) else {
                    prop_assert_eq!(s, before, "a refused event changes nothing");
                    continue;
                };
                // A node is never the primary of two generations: promotion
                // only ever starts from a mirror.
                if e.kind() == EventKind::Promote {
                    prop_assert_eq!(before.role, Role::Mirror);
                }
                for a in actions {
                    match a {
                        StorePromotion => {
                            let old = m.generations;
                            next_id += 1;
                            promotion_record(&mut m, next_id);
                            prop_assert!(!ids(&old).contains(&m.generations.current), "a new generation");
                            if old.current != 0 {
                                prop_assert_eq!(m.generations.history[0], old.current, "whose history names the old one");
                            }
                            prop_assert_eq!(m.promoted_from, old.current);
                        }
                        StoreDemotion => demotion_record(&mut m),
                        StoreDiscard => {
                            discard_record(&mut m);
                            prop_assert!(m.generations.is_blank());
                        }
                        RecordDiskFailure => prop_assert_eq!(s.disk, Disk::Failed),
                        _ => {}
                    }
                }
                ever_failed |= s.disk == Disk::Failed;
                // Host writes only as the primary; never while demoting or
                // promoting; the export read-only whenever they are refused.
                prop_assert_eq!(s.accepts_host_writes(), s.role == Role::Primary);
                prop_assert_eq!(s.export_read_only(), !s.accepts_host_writes());
                // A primary feeds the volume only while it is a mirror.
                prop_assert_eq!(s.accepts_primary(), s.role == Role::Mirror);
                if matches!(s.role, Role::Demoting { .. } | Role::Promoting(_)) {
                    prop_assert!(!s.accepts_host_writes() && !s.accepts_primary() && !s.is_settled());
                }
                // A failed disk is never used again in this run.
                prop_assert_eq!(s.disk == Disk::Failed, ever_failed);
                prop_assert_eq!(s.serves_local_io(), !ever_failed);
                // The primary holds exactly one generation, the current one,
                // and its record names no mirror label.
                if s.role == Role::Primary {
                    prop_assert_eq!(m.label, MirrorLabel::None);
                    prop_assert_eq!(m.primary_at, m.generations.current);
                    prop_assert!(m.generations.current != 0);
                }
                prop_assert_eq!(RoleState::from_word(s.to_word()), s);
                prop_assert_eq!(s.status_str() == "primary", s.role == Role::Primary);
            }
        }
    }
}
