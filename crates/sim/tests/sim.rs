//! Seeded simulation runs. `SIM_SEEDS=N` runs N seeds (default 2000),
//! `SIM_SEED=S` replays one with its trace.

use std::time::Instant;

fn env(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number"))
    })
}

#[test]
fn seeded_simulation_runs_keep_every_invariant() {
    if let Some(s) = env("SIM_SEED") {
        let rule = match std::env::var("SIM_RULE").as_deref() {
            Ok("before_fix") => blockmirror_sim::Rules::BEFORE_FIX,
            _ => blockmirror_sim::Rules::FIXED,
        };
        match blockmirror_sim::run_with(s, true, rule) {
            Ok(sum) => {
                println!("seed {s} passed: {sum:?}");
                return;
            }
            Err(f) => panic!("\n{f}"),
        }
    }
    let n = env("SIM_SEEDS").unwrap_or(2000);
    let from = env("SIM_FROM").unwrap_or(0);
    let t = Instant::now();
    let (mut acked, mut faults, mut rotations, mut failures, mut overflows) = (0, 0, 0, 0, 0);
    for s in from..from + n {
        match blockmirror_sim::check_seed(s) {
            Ok(sum) => {
                acked += sum.writes_acked;
                faults += sum.faults;
                rotations += sum.rotations;
                failures += sum.link_failures;
                overflows += sum.history_overflows;
            }
            Err(f) => panic!("\n{f}"),
        }
    }
    println!(
        "{n} seeds in {:.1?}: {acked} host writes acknowledged, {faults} faults, \
         {failures} link failures, {rotations} generation rotations, \
         {overflows} mirrors past the generation history",
        t.elapsed()
    );
}

#[test]
fn a_seed_replays_exactly() {
    let a = blockmirror_sim::run(7, false).map(|s| (s.steps, s.end_time, s.writes_acked));
    let b = blockmirror_sim::run(7, true).map(|s| (s.steps, s.end_time, s.writes_acked));
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
}

/// The node's generation rule before the fix (`GenState`: one flag per volume, set
/// when a mirror acknowledges "in sync") against the per-mirror rule the
/// simulation drives (set when "in sync" is sent). The node's rule
///
/// - rotates on every write one mirror misses while another is in sync and
///   re-announced, so a mirror away for more than `HISTORY_LEN` such writes
///   leaves the history and comes back `Unrelated` (fenced, needing
///   `resync --discard-local`);
/// - answers a write the mirror missed without rotating when the mirror
///   stored an "in sync" whose acknowledgement never came back (the
///   mirror fails a write with a Nack, then stores the re-announcement
///   queued behind it; the Nack ends the link before its Ack is read).
#[test]
fn the_old_generation_rule_overflows_the_history_and_misses_a_rotation() {
    use blockmirror_sim::{run_with, GenRule, Rules};
    let node = Rules {
        gen: GenRule::NodeGlobal,
        ..Rules::FIXED
    };
    let (mut node_overflows, mut fixed_overflows, mut missed_rotation) = (0, 0, 0);
    for s in 0..300 {
        match run_with(s, false, node) {
            Ok(sum) => node_overflows += sum.history_overflows,
            Err(f) if f.check == "missed_write_starts_new_generation" => {
                if missed_rotation == 0 {
                    println!("first missed rotation under the node's rule: {f}");
                }
                missed_rotation += 1
            }
            Err(f) => panic!("{f}"),
        }
        fixed_overflows += run_with(s, false, Rules::FIXED)
            .expect("passes")
            .history_overflows;
    }
    println!("node rule: {node_overflows} overflows, {missed_rotation} missed rotations; per-link rule: {fixed_overflows} overflows");
    assert!(missed_rotation > 0);
    assert!(node_overflows > 3 * fixed_overflows.max(1));
}

/// The node stored the bare bitmap (before the fix): a catch-up copy the mirror acknowledged
/// (its bit cleared) but had not flushed is forgotten by a primary crash and
/// lost for good if the mirror crashes too (seed 24: the primary is killed
/// while catching a mirror up, the mirror is killed and loses block 35, the
/// restarted primary's recovered bitmap does not mark it). Storing the
/// unflushed regions as marked closes it.
#[test]
fn the_old_bitmap_store_forgets_unflushed_copies() {
    use blockmirror_sim::{run_with, Rules};
    let bare = Rules {
        store_unflushed: false,
        ..Rules::FIXED
    };
    let f = run_with(24, false, bare).unwrap_err();
    assert_eq!(f.check, "every_difference_is_marked", "{f}");
    run_with(24, false, Rules::FIXED).expect("passes when unflushed regions are stored");
}
