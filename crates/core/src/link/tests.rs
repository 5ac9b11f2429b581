use super::*;
use proptest::prelude::*;

fn all_phases() -> Vec<Phase> {
    let fences = [None, Some(Fence::Suspended), Some(Fence::SplitBrain)];
    let mut v = vec![
        Phase::Parked,
        Phase::Handshaking,
        Phase::Joining,
        Phase::Filling,
        Phase::CatchingUp,
        Phase::InSync,
        Phase::Inconsistent,
        Phase::Stopped,
    ];
    for f in fences {
        v.push(Phase::Idle { fence: f });
        v.push(Phase::Connecting { fence: f });
    }
    v
}

fn all_events(epoch: u64) -> Vec<Event> {
    let mut v = vec![
        Event::Activate,
        Event::Park,
        Event::Connect,
        Event::ConnectFailed,
        Event::DivergenceRead,
        Event::DivergenceFailed,
        Event::OverLag,
        Event::LagRecovered,
        Event::MarkedRegions,
        Event::Stop,
    ];
    for j in [
        Judgment::Sync { full_copy: false },
        Judgment::Sync { full_copy: true },
        Judgment::PeerAhead,
        Judgment::SplitBrain,
        Judgment::Unrelated,
    ] {
        v.push(Event::Handshake(j));
    }
    for e in [epoch, epoch.wrapping_sub(1)] {
        for (bitmap_clear, iterative) in
            [(true, true), (true, false), (false, true), (false, false)]
        {
            v.push(Event::Joined {
                epoch: e,
                bitmap_clear,
                iterative,
            });
        }
        v.push(Event::JoinFailed { epoch: e });
        v.push(Event::FillDone { epoch: e });
        v.push(Event::CatchUpDone { epoch: e });
        for c in [FailCause::Peer, FailCause::Timeout, FailCause::Group] {
            v.push(Event::Lost {
                epoch: Some(e),
                cause: c,
            });
        }
    }
    for c in [FailCause::Peer, FailCause::Timeout, FailCause::Group] {
        v.push(Event::Lost {
            epoch: None,
            cause: c,
        });
    }
    v
}

fn machine(phase: Phase, scratch: bool) -> LinkMachine {
    LinkMachine {
        phase,
        epoch: 7,
        scratch,
        met: false,
    }
}

/// Properties every transition keeps, checked for one step.
fn check_step(before: &LinkMachine, event: Event, after: &LinkMachine, out: &Outcome) {
    assert!(after.epoch >= before.epoch, "epoch never goes back");
    if let Outcome::Stale = out {
        assert_eq!(before, after, "a stale event changes nothing");
        return;
    }
    let Outcome::Moved(actions) = out else {
        unreachable!()
    };
    // A live link that stops being live fails what it had in flight.
    if before.is_live() && !after.is_live() {
        assert!(
            actions.contains(&Action::FailInflight),
            "{before:?} {event:?}"
        );
        assert!(actions.contains(&Action::CancelConnection));
        assert!(after.epoch > before.epoch, "a lost connection's epoch ends");
    }
    if actions.contains(&Action::FailInflight) {
        assert!(before.is_live());
    }
    // Only a live link starts a catch-up, on its own connection.
    for a in actions {
        match *a {
            Action::StartCatchUp { epoch } | Action::GoLive { epoch } => {
                assert!(after.is_live());
                assert_eq!(epoch, after.epoch);
            }
            Action::Adopt { epoch } => {
                assert_eq!(after.phase, Phase::Joining);
                assert_eq!(epoch, after.epoch);
            }
            _ => {}
        }
    }
    // A fenced link never reports in sync, and is never live.
    if matches!(
        after.phase,
        Phase::Idle { fence: Some(_) } | Phase::Connecting { fence: Some(_) }
    ) {
        assert_ne!(after.sync_state(), SyncState::InSync);
        assert!(!after.is_live());
    }
    // In sync only after a catch-up confirmed it or with nothing marked.
    if after.phase == Phase::InSync && before.phase != Phase::InSync {
        assert!(
            matches!(
                event,
                Event::CatchUpDone { .. }
                    | Event::Joined {
                        bitmap_clear: true,
                        ..
                    }
            ),
            "{before:?} --{event:?}--> InSync"
        );
    }
    // A blank mirror's fill is never forgotten: a fill cut short leaves
    // scratch set for the next connection.
    if before.phase == Phase::Filling && !after.is_live() {
        assert!(after.scratch);
    }
    // Connected in /status exactly while the driver holds a connection.
    assert_eq!(
        after.connection() == Connection::Connected,
        after.has_connection()
    );
    let met_before = before.met;
    let reports = actions.iter().filter(|a| **a == Action::ReportMet).count();
    assert!(reports <= 1);
    if met_before {
        assert_eq!(reports, 0, "the start gate is told once");
    }
}

#[test]
fn every_event_in_every_phase_is_decided() {
    let mut legal = 0;
    let mut illegal = 0;
    for phase in all_phases() {
        for scratch in [false, true] {
            for event in all_events(7) {
                let before = machine(phase, scratch);
                let mut after = before.clone();
                match after.on(event) {
                    Ok(out) => {
                        legal += 1;
                        check_step(&before, event, &after, &out);
                    }
                    Err(e) => {
                        illegal += 1;
                        assert_eq!(before, after, "an illegal event changes nothing");
                        assert_eq!(e.phase, phase);
                        assert_eq!(e.event, event);
                    }
                }
            }
        }
    }
    assert!(legal > 0 && illegal > 0);
}

#[test]
fn a_stopped_link_takes_nothing() {
    for event in all_events(7) {
        let mut m = machine(Phase::Stopped, false);
        let r = m.on(event);
        assert!(r.is_err() || r == Ok(Outcome::Stale), "{event:?}: {r:?}");
        assert_eq!(m, machine(Phase::Stopped, false));
    }
}

fn connect(m: &mut LinkMachine, judgment: Judgment) -> u64 {
    m.on(Event::Connect).unwrap();
    m.on(Event::Handshake(judgment)).unwrap();
    match m.on(Event::DivergenceRead).unwrap() {
        Outcome::Moved(v) => match v[..] {
            [Action::Adopt { epoch }] => epoch,
            _ => panic!("{v:?}"),
        },
        Outcome::Stale => panic!(),
    }
}

#[test]
fn a_blank_mirror_fills_then_catches_up_then_is_in_sync() {
    let mut m = LinkMachine::new(true);
    let e = connect(&mut m, Judgment::Sync { full_copy: true });
    let out = m
        .on(Event::Joined {
            epoch: e,
            bitmap_clear: false,
            iterative: true,
        })
        .unwrap();
    assert_eq!(
        out,
        Outcome::Moved(vec![
            Action::GoLive { epoch: e },
            Action::ReportMet,
            Action::StartCatchUp { epoch: e }
        ])
    );
    assert_eq!(m.phase(), Phase::Filling);
    assert_eq!(m.sync_state(), SyncState::Resyncing);
    // Catch-up cannot declare a filling mirror in sync.
    assert!(m.on(Event::CatchUpDone { epoch: e }).is_err());
    m.on(Event::FillDone { epoch: e }).unwrap();
    m.on(Event::CatchUpDone { epoch: e }).unwrap();
    assert_eq!(m.sync_state(), SyncState::InSync);
}

#[test]
fn a_fill_cut_short_fills_again_on_the_next_connection() {
    let mut m = LinkMachine::new(true);
    let e = connect(&mut m, Judgment::Sync { full_copy: true });
    m.on(Event::Joined {
        epoch: e,
        bitmap_clear: false,
        iterative: true,
    })
    .unwrap();
    let out = m
        .on(Event::Lost {
            epoch: Some(e),
            cause: FailCause::Peer,
        })
        .unwrap();
    assert_eq!(
        out,
        Outcome::Moved(vec![
            Action::CancelConnection,
            Action::FailInflight,
            Action::CutGroup,
            Action::CountFailure
        ])
    );
    assert_eq!(m.sync_state(), SyncState::Degraded);
    // The next handshake finds a mirror with our lineage: no full copy
    // is judged, yet the fill resumes from scratch.
    let e2 = connect(&mut m, Judgment::Sync { full_copy: false });
    assert!(e2 > e);
    m.on(Event::Joined {
        epoch: e2,
        bitmap_clear: false,
        iterative: true,
    })
    .unwrap();
    assert_eq!(m.phase(), Phase::Filling);
}

#[test]
fn events_of_an_old_connection_are_stale() {
    let mut m = LinkMachine::new(true);
    let e = connect(&mut m, Judgment::Sync { full_copy: false });
    m.on(Event::Joined {
        epoch: e,
        bitmap_clear: false,
        iterative: false,
    })
    .unwrap();
    m.on(Event::Lost {
        epoch: Some(e),
        cause: FailCause::Timeout,
    })
    .unwrap();
    let e2 = connect(&mut m, Judgment::Sync { full_copy: false });
    m.on(Event::Joined {
        epoch: e2,
        bitmap_clear: false,
        iterative: false,
    })
    .unwrap();
    // The first connection's catch-up and watchdog report late.
    assert_eq!(m.on(Event::CatchUpDone { epoch: e }), Ok(Outcome::Stale));
    assert_eq!(
        m.on(Event::Lost {
            epoch: Some(e),
            cause: FailCause::Timeout
        }),
        Ok(Outcome::Stale)
    );
    assert_eq!(m.phase(), Phase::CatchingUp);
}

#[test]
fn split_brain_is_kept_while_retrying_and_cleared_by_a_good_handshake() {
    let mut m = LinkMachine::new(true);
    m.on(Event::Connect).unwrap();
    assert_eq!(
        m.on(Event::Handshake(Judgment::SplitBrain)).unwrap(),
        Outcome::Moved(vec![Action::ReportMet])
    );
    assert_eq!(m.sync_state(), SyncState::SplitBrain);
    m.on(Event::Connect).unwrap();
    assert_eq!(m.sync_state(), SyncState::SplitBrain);
    assert_eq!(m.connection(), Connection::Connecting);
    m.on(Event::ConnectFailed).unwrap();
    assert_eq!(m.sync_state(), SyncState::SplitBrain);
    connect(&mut m, Judgment::Sync { full_copy: true });
    assert_eq!(m.sync_state(), SyncState::Degraded);
}

#[test]
fn a_promoted_peer_demotes_before_the_gate_opens() {
    let mut m = LinkMachine::new(true);
    m.on(Event::Connect).unwrap();
    assert_eq!(
        m.on(Event::Handshake(Judgment::PeerAhead)).unwrap(),
        Outcome::Moved(vec![Action::DemoteVolume, Action::ReportMet])
    );
    assert_eq!(m.sync_state(), SyncState::Suspended);
}

#[test]
fn a_connection_adopted_after_parking_is_refused() {
    let mut m = LinkMachine::new(true);
    m.on(Event::Connect).unwrap();
    m.on(Event::Handshake(Judgment::Sync { full_copy: false }))
        .unwrap();
    m.on(Event::Park).unwrap();
    assert!(m.on(Event::DivergenceRead).is_err());
    assert_eq!(m.connection(), Connection::Disconnected);
    assert!(
        m.on(Event::Connect).is_err(),
        "a parked link does not connect"
    );
    m.on(Event::Activate).unwrap();
    m.on(Event::Connect).unwrap();
}

#[test]
fn group_cuts_do_not_cascade_and_joining_links_fail_nothing() {
    let mut m = LinkMachine::new(true);
    let e = connect(&mut m, Judgment::Sync { full_copy: false });
    // Joining: the connection is cancelled, nothing was sent on it.
    assert_eq!(
        m.on(Event::Lost {
            epoch: None,
            cause: FailCause::Group
        })
        .unwrap(),
        Outcome::Moved(vec![Action::CancelConnection])
    );
    let e2 = connect(&mut m, Judgment::Sync { full_copy: false });
    assert!(e2 > e);
    m.on(Event::Joined {
        epoch: e2,
        bitmap_clear: true,
        iterative: false,
    })
    .unwrap();
    assert_eq!(
        m.on(Event::Lost {
            epoch: None,
            cause: FailCause::Group
        })
        .unwrap(),
        Outcome::Moved(vec![
            Action::CancelConnection,
            Action::FailInflight,
            Action::CountFailure
        ])
    );
}

#[test]
fn async_lag_bound_makes_the_mirror_inconsistent_until_copied() {
    let mut m = LinkMachine::new(true);
    let e = connect(&mut m, Judgment::Sync { full_copy: false });
    m.on(Event::Joined {
        epoch: e,
        bitmap_clear: true,
        iterative: false,
    })
    .unwrap();
    assert_eq!(
        m.on(Event::OverLag).unwrap(),
        Outcome::Moved(vec![Action::WarnInconsistent])
    );
    assert_eq!(m.on(Event::OverLag).unwrap(), Outcome::Moved(vec![]));
    assert_eq!(m.sync_state(), SyncState::Inconsistent);
    assert_eq!(
        m.on(Event::LagRecovered).unwrap(),
        Outcome::Moved(vec![Action::StartCatchUp { epoch: e }])
    );
    m.on(Event::CatchUpDone { epoch: e }).unwrap();
    assert!(m.in_sync());
}

fn any_event() -> impl Strategy<Value = (u8, u8, bool, bool, bool)> {
    (0u8..28, 0u8..3, any::<bool>(), any::<bool>(), any::<bool>())
}

/// Builds an event from random parts; epochs are the current one or an
/// older one, as a driver with late tasks sends them.
fn build(m: &LinkMachine, (k, c, a, b, old): (u8, u8, bool, bool, bool)) -> Event {
    let epoch = if old {
        m.epoch.saturating_sub(1)
    } else {
        m.epoch
    };
    let cause = [FailCause::Peer, FailCause::Timeout, FailCause::Group][c as usize];
    match k {
        0 => Event::Activate,
        1 => Event::Park,
        2..=4 => Event::Connect,
        5 => Event::ConnectFailed,
        6 => Event::Handshake(Judgment::Sync { full_copy: a }),
        7 => Event::Handshake(Judgment::Sync { full_copy: false }),
        8 => Event::Handshake(Judgment::PeerAhead),
        9 => Event::Handshake(Judgment::SplitBrain),
        10 => Event::Handshake(Judgment::Unrelated),
        11 | 12 => Event::DivergenceRead,
        13 => Event::DivergenceFailed,
        14..=16 => Event::Joined {
            epoch,
            bitmap_clear: a,
            iterative: b,
        },
        17 => Event::JoinFailed { epoch },
        18 | 19 => Event::Lost {
            epoch: if a { None } else { Some(epoch) },
            cause,
        },
        20 => Event::FillDone { epoch },
        21 | 22 => Event::CatchUpDone { epoch },
        23 => Event::OverLag,
        24 => Event::LagRecovered,
        25 => Event::MarkedRegions,
        26 => Event::Activate,
        _ => Event::Stop,
    }
}

proptest! {
    #[test]
    fn random_histories_keep_the_invariants(
        events in proptest::collection::vec(any_event(), 1..200)
    ) {
        let mut m = LinkMachine::new(true);
        let mut reported = 0;
        for parts in events {
            let event = build(&m, parts);
            let before = m.clone();
            match m.on(event) {
                Ok(out) => {
                    check_step(&before, event, &m, &out);
                    if let Outcome::Moved(v) = &out {
                        reported += v.iter().filter(|a| **a == Action::ReportMet).count();
                    }
                }
                Err(_) => prop_assert_eq!(&before, &m),
            }
            if m.phase == Phase::Stopped {
                break;
            }
        }
        prop_assert!(reported <= 1);
    }
}
