//! Kill tests of asynchronous mirroring (DESIGN.md guarantee 2: the mirror
//! always holds a state the primary passed through), shared by
//! async_mirror.rs (plain links) and tls.rs (the same rounds over TLS):
//! the history writer runs against the primary, the primary or the mirror
//! is killed at a random point, and the checker reads the mirror's image.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use blockmirror_testkit::history::{self, Require};
use blockmirror_testkit::writer::{self, Progress, WriterConfig};

use super::{wait_for, Pair, PairBuilder};

/// Kill points per run (`default` unless `BLOCKMIRROR_ASYNC_KILLS` says
/// otherwise, for a soak).
pub fn kills(default: usize) -> usize {
    std::env::var("BLOCKMIRROR_ASYNC_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A small xorshift, so each run's kill points differ but can be replayed
/// from the printed seed.
pub fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// `BLOCKMIRROR_SEED`, else one from the clock (printed by the callers).
pub fn seed() -> u64 {
    std::env::var("BLOCKMIRROR_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        })
}

/// Runs the history writer against the primary until `acked` writes were
/// answered, then kills the primary (`kill_primary`) or the mirror while it runs.
pub fn write_then_kill(pair: &mut Pair, log: &std::path::Path, acked: u64, kill_primary: bool) {
    let mut cfg = WriterConfig::new(pair.primary.uri(), log, 2048, Duration::from_secs(30));
    cfg.queue_depth = 16;
    cfg.flush_every = 64;
    let progress = Progress::default();
    std::thread::scope(|s| {
        let w = s.spawn(|| writer::run(&cfg, &progress));
        wait_for("acknowledged writes", Duration::from_secs(30), || {
            assert!(!w.is_finished(), "the writer stopped early");
            (progress.writes_acked.load(Relaxed) >= acked).then_some(())
        });
        if kill_primary {
            pair.primary.stop_with("KILL");
        } else {
            pair.mirror.stop_with("KILL");
            progress.stop.store(true, Relaxed);
        }
        let _ = w.join().unwrap();
    });
}

/// The mirror's image is dependency closed against the history `log`.
pub fn check_prefix(image: &std::path::Path, log: &std::path::Path, what: &str) {
    let report = history::check_image(image, log).unwrap();
    let text = report.summary();
    assert!(
        report.holds(Require::Prefix),
        "{what}: the mirror is not dependency closed:\n{text}"
    );
}

/// `rounds` times: an async pair from `make(round)` (its mirror table must
/// say `mode = "async"`), the primary killed after a random number of
/// acknowledged writes; the mirror, once it saw the link drop, must be
/// dependency closed.
pub fn primary_kill_rounds(rounds: usize, make: impl Fn(usize) -> PairBuilder) {
    let mut seed = seed();
    println!("seed {seed} (BLOCKMIRROR_SEED replays it)");
    for round in 0..rounds {
        let mut pair = make(round).start();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("history.log");
        let acked = 200 + rng(&mut seed) % 3000;
        write_then_kill(&mut pair, &log, acked, true);
        // The mirror applies what it received, then sees the link drop.
        wait_for(
            "the mirror to see the link drop",
            Duration::from_secs(10),
            || {
                pair.mirror.status_json()["volumes"][0]["primary"]
                    .is_null()
                    .then_some(())
            },
        );
        check_prefix(
            pair.mirror.image(),
            &log,
            &format!("round {round}, killed after {acked} acknowledged writes"),
        );
    }
}

/// `rounds` times: an async pair from `make(round)`, the mirror killed
/// mid-apply after a random number of acknowledged writes; what it applied
/// must be dependency closed, and restarted it must catch up to identical.
pub fn mirror_kill_rounds(rounds: usize, make: impl Fn(usize) -> PairBuilder) {
    let mut seed = seed();
    println!("seed {seed} (BLOCKMIRROR_SEED replays it)");
    for round in 0..rounds {
        let mut pair = make(round).start();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("history.log");
        let acked = 500 + rng(&mut seed) % 3000;
        write_then_kill(&mut pair, &log, acked, false);
        // What the killed mirror had applied (its page cache survives a
        // process kill) is a state the primary passed through.
        check_prefix(
            pair.mirror.image(),
            &log,
            &format!("round {round}, mirror killed after {acked} acknowledged writes"),
        );
        // Restarted, it catches up and ends identical.
        pair.mirror.spawn();
        pair.wait_in_sync(Duration::from_secs(30));
        pair.flush_primary();
        wait_for("the last writes applied", Duration::from_secs(10), || {
            (pair.link()["lag_bytes"] == 0).then_some(())
        });
        pair.assert_images_identical();
    }
}
