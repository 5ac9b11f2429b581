//! Read balancing (seed 004, FIG. 9): which path serves a host read.
//!
//! A primary volume with `read_policy = "balanced"` can read from its local
//! backend (path 0) or from any mirror that holds exactly the primary's data
//! (paths 1..). This module decides which, from measured latency only; it
//! does no I/O and knows nothing about links. The caller says, per read,
//! which paths are eligible (the local disk is not failed; a mirror is
//! sync, live and in sync), times the read, and reports the sample back.
//!
//! The rule:
//!
//! - Each path keeps an exponentially weighted moving average (EWMA) of its
//!   read latency: `ewma += (sample - ewma) * weight`, with a weight of
//!   1/8 by default (a sample's influence halves after about 5 reads of
//!   that path). The first sample sets the average. A sample that comes
//!   after `k` reads went to other paths counts as `k` ordinary samples
//!   (weight `1 - (1 - w)^k`, `k` capped at [`MAX_CATCH_UP`]): the estimate
//!   it updates is that old. Without this a path that lost its reads while
//!   slow would need hundreds of probes to win them back once healed; with
//!   it, two or three; and a single lucky probe still cannot flip a path
//!   that is many times slower.
//! - A read goes to the eligible path with the lowest average.
//! - An eligible path with no sample yet is tried first (nothing is known
//!   about it, and one read tells).
//! - So that an estimate cannot go stale (the losing path is otherwise never
//!   measured again, and a disk that was slow for a second would never win
//!   back its reads), every `probe_every`-th read goes to an eligible path
//!   other than the best, the one whose last sample is oldest, unless that
//!   path was sampled less than `min_probe_interval` ago; and a path whose
//!   last sample is older than `max_age` is probed at the next read
//!   whatever the counter says. So at most 1 in 64 reads (the default)
//!   takes the slower path, and at most one per 10 ms per path: freshness
//!   is a matter of time, not of load, and a busy volume (100k reads/s)
//!   would otherwise send 1600 probes a second, each costing CPU on both
//!   nodes, to learn what 100 tell.
//! - A failed read through a path (the caller fell back to another) counts
//!   as a sample of `error_penalty` (default 1 s), so a path that errors
//!   loses its reads at once and wins them back only when probes show it
//!   fast again.
//!
//! Time is a caller-supplied monotonic nanosecond count, so tests drive it.

/// The most ordinary samples one late sample counts as.
pub const MAX_CATCH_UP: u32 = 8;

/// Tunables of a [`ReadChooser`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChooserConfig {
    /// Weight of a new sample in the average, in (0, 1].
    pub weight: f64,
    /// Every this many reads, one probes a non-best path (0: never by
    /// count; 1 is refused, it would leave no read to the best path).
    pub probe_every: u64,
    /// A path whose last sample is older than this (ns) is probed next.
    pub max_age_ns: u64,
    /// A probe by count skips a path sampled less than this (ns) ago.
    pub min_probe_interval_ns: u64,
    /// The sample a failed read counts as (ns).
    pub error_penalty_ns: u64,
}

impl Default for ChooserConfig {
    fn default() -> Self {
        Self {
            weight: 1.0 / 8.0,
            probe_every: 64,
            max_age_ns: 1_000_000_000,
            min_probe_interval_ns: 10_000_000,
            error_penalty_ns: 1_000_000_000,
        }
    }
}

/// What one path knows about itself.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PathEstimate {
    /// The moving average of read latency in ns; None before any sample.
    pub ewma_ns: Option<f64>,
    /// When the last sample was taken (the caller's clock).
    pub last_sample_ns: u64,
    /// Reads this chooser sent to the path.
    pub chosen: u64,
    /// Of those, probes (sent there although another path looked faster).
    pub probes: u64,
    /// The chooser's read count when the path was last sampled.
    last_read: u64,
}

/// Where one read goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    /// The path index (0: local).
    pub path: usize,
    /// True when the path was chosen to refresh its estimate, not because
    /// it looked fastest.
    pub probe: bool,
}

/// The chooser of one volume: an estimate per path.
#[derive(Debug, Clone)]
pub struct ReadChooser {
    cfg: ChooserConfig,
    paths: Vec<PathEstimate>,
    reads: u64,
}

impl ReadChooser {
    /// A chooser for `paths` paths (local plus each mirror).
    ///
    /// # Panics
    /// If `cfg.weight` is not in (0, 1], or `cfg.probe_every` is 1.
    pub fn new(paths: usize, cfg: ChooserConfig) -> Self {
        assert!(
            cfg.weight > 0.0 && cfg.weight <= 1.0,
            "EWMA weight must be in (0, 1]"
        );
        assert!(cfg.probe_every != 1, "probe_every must be 0 or at least 2");
        Self {
            cfg,
            paths: vec![PathEstimate::default(); paths],
            reads: 0,
        }
    }

    /// Number of paths.
    pub fn paths(&self) -> usize {
        self.paths.len()
    }

    /// One path's estimate (None for an index out of range).
    pub fn estimate(&self, path: usize) -> Option<&PathEstimate> {
        self.paths.get(path)
    }

    /// Picks the path for a read at `now_ns` among those `eligible` says
    /// (indexed like the paths; missing entries count as not eligible).
    /// None when no path is eligible.
    pub fn choose(&mut self, now_ns: u64, eligible: &[bool]) -> Option<Choice> {
        let n = self.paths.len();
        // Called for every host read: iterators, no allocation.
        let candidates = || (0..n).filter(|&i| eligible.get(i).copied().unwrap_or(false));
        let count = candidates().count();
        if count == 0 {
            return None;
        }
        self.reads += 1;
        // Unknown first: one read measures it.
        let choice = if let Some(i) = candidates().find(|&i| self.paths[i].ewma_ns.is_none()) {
            Choice {
                path: i,
                probe: count > 1,
            }
        } else {
            let best = candidates()
                .min_by(|&a, &b| self.ewma(a).total_cmp(&self.ewma(b)).then(a.cmp(&b)))
                .expect("not empty");
            // The stalest other path, if probing is due.
            let stalest = candidates()
                .filter(|&i| i != best)
                .min_by_key(|&i| (self.paths[i].last_sample_ns, i));
            let by_count = self.cfg.probe_every > 0 && self.reads % self.cfg.probe_every == 0;
            let age = |s: usize| now_ns.saturating_sub(self.paths[s].last_sample_ns);
            match stalest {
                Some(s)
                    if (by_count && age(s) >= self.cfg.min_probe_interval_ns)
                        || age(s) > self.cfg.max_age_ns =>
                {
                    // Refreshed by this read: the age rule fires once, not
                    // for every read until the sample comes back.
                    self.paths[s].last_sample_ns = now_ns;
                    Choice {
                        path: s,
                        probe: true,
                    }
                }
                _ => Choice {
                    path: best,
                    probe: false,
                },
            }
        };
        let p = &mut self.paths[choice.path];
        p.chosen += 1;
        if choice.probe {
            p.probes += 1;
        }
        Some(choice)
    }

    /// A read through `path` took `latency_ns`, finishing at `now_ns`.
    pub fn record(&mut self, path: usize, now_ns: u64, latency_ns: u64) {
        let reads = self.reads;
        let Some(p) = self.paths.get_mut(path) else {
            return;
        };
        // Reads since this path's last sample, this one included.
        let k = reads
            .saturating_sub(p.last_read)
            .clamp(1, u64::from(MAX_CATCH_UP)) as i32;
        let w = 1.0 - (1.0 - self.cfg.weight).powi(k);
        let s = latency_ns as f64;
        p.ewma_ns = Some(match p.ewma_ns {
            None => s,
            Some(e) => e + (s - e) * w,
        });
        p.last_sample_ns = p.last_sample_ns.max(now_ns);
        p.last_read = reads;
    }

    /// A read through `path` failed at `now_ns` (the caller served it
    /// another way): counted as a sample of the error penalty.
    pub fn record_error(&mut self, path: usize, now_ns: u64) {
        self.record(path, now_ns, self.cfg.error_penalty_ns);
    }

    /// The average of `path` (infinite before a sample: never the best).
    fn ewma(&self, path: usize) -> f64 {
        self.paths[path].ewma_ns.unwrap_or(f64::INFINITY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: u64 = 1_000_000;

    fn no_probes() -> ChooserConfig {
        ChooserConfig {
            probe_every: 0,
            max_age_ns: u64::MAX,
            ..ChooserConfig::default()
        }
    }

    /// Probes by count only, whatever the time between reads.
    fn by_count() -> ChooserConfig {
        ChooserConfig {
            max_age_ns: u64::MAX,
            min_probe_interval_ns: 0,
            ..ChooserConfig::default()
        }
    }

    #[test]
    fn unknown_paths_are_measured_first_then_the_fastest_wins() {
        let mut c = ReadChooser::new(2, no_probes());
        let all = [true, true];
        let first = c.choose(0, &all).unwrap();
        assert_eq!(
            first,
            Choice {
                path: 0,
                probe: true
            }
        );
        c.record(0, 1, 2 * MS);
        let second = c.choose(1, &all).unwrap();
        assert_eq!(
            second,
            Choice {
                path: 1,
                probe: true
            }
        );
        c.record(1, 2, MS / 10);
        for t in 3..100 {
            let ch = c.choose(t, &all).unwrap();
            assert_eq!(
                ch,
                Choice {
                    path: 1,
                    probe: false
                }
            );
            c.record(1, t, MS / 10);
        }
        assert_eq!(c.estimate(0).unwrap().chosen, 1);
        assert_eq!(c.estimate(1).unwrap().chosen, 98);
    }

    #[test]
    fn ineligible_paths_are_never_chosen() {
        let mut c = ReadChooser::new(3, ChooserConfig::default());
        c.record(1, 0, 1);
        for t in 0..1000 {
            let ch = c.choose(t, &[true, false, true]).unwrap();
            assert_ne!(ch.path, 1);
            c.record(ch.path, t, 5 * MS);
        }
        assert_eq!(c.choose(0, &[false, false, false]), None);
        assert_eq!(c.choose(0, &[]), None);
        // Only one eligible path: it is never a "probe".
        let ch = c.choose(1, &[false, false, true]).unwrap();
        assert_eq!(
            ch,
            Choice {
                path: 2,
                probe: false
            }
        );
    }

    #[test]
    fn one_read_in_probe_every_refreshes_the_loser() {
        let mut c = ReadChooser::new(2, by_count());
        c.record(0, 0, 10_000);
        c.record(1, 0, 100_000);
        let mut probes = 0;
        for t in 1..=6400 {
            let ch = c.choose(t, &[true, true]).unwrap();
            if ch.path == 1 {
                assert!(ch.probe);
                probes += 1;
            }
            c.record(ch.path, t, if ch.path == 0 { 10_000 } else { 100_000 });
        }
        assert_eq!(probes, 100, "one in 64 of 6400 reads");
    }

    #[test]
    fn probes_by_count_are_at_most_one_per_interval() {
        // 100k reads a second for one second: 1 in 64 would be 1562 probes.
        let mut c = ReadChooser::new(2, ChooserConfig::default());
        c.record(0, 0, 10_000);
        c.record(1, 0, 100_000);
        let mut probes = 0;
        for i in 1..=100_000u64 {
            let t = i * 10_000;
            let ch = c.choose(t, &[true, true]).unwrap();
            probes += u64::from(ch.path == 1);
            c.record(ch.path, t, if ch.path == 0 { 10_000 } else { 100_000 });
        }
        // At most one per 10 ms (the next 64th read after it: 97 or so).
        assert!((90..=100).contains(&probes), "one per 10 ms: {probes}");
        // At 100 reads a second, the count rules: 1 in 64.
        let mut c = ReadChooser::new(2, ChooserConfig::default());
        c.record(0, 0, 10_000);
        c.record(1, 0, 100_000);
        let mut probes = 0;
        for i in 1..=6400u64 {
            let t = i * 10_000_000;
            let ch = c.choose(t, &[true, true]).unwrap();
            probes += u64::from(ch.path == 1);
            c.record(ch.path, t, if ch.path == 0 { 10_000 } else { 100_000 });
        }
        assert_eq!(probes, 100);
    }

    #[test]
    fn a_stale_estimate_is_probed_once_then_again_after_max_age() {
        let cfg = ChooserConfig {
            probe_every: 0,
            max_age_ns: 100 * MS,
            min_probe_interval_ns: 0,
            ..ChooserConfig::default()
        };
        let mut c = ReadChooser::new(2, cfg);
        c.record(0, 0, 10_000);
        c.record(1, 0, 100_000);
        assert_eq!(c.choose(50 * MS, &[true, true]).unwrap().path, 0);
        let p = c.choose(101 * MS, &[true, true]).unwrap();
        assert_eq!(
            p,
            Choice {
                path: 1,
                probe: true
            }
        );
        // Its sample has not come back yet: not probed again at once.
        assert_eq!(c.choose(102 * MS, &[true, true]).unwrap().path, 0);
        assert_eq!(c.choose(150 * MS, &[true, true]).unwrap().path, 0);
        assert_eq!(c.choose(202 * MS, &[true, true]).unwrap().path, 1);
    }

    #[test]
    fn a_disk_that_slows_down_loses_its_reads_and_wins_them_back() {
        let mut c = ReadChooser::new(2, ChooserConfig::default());
        let mut local_lat = 20_000u64; // 20 us
        let mirror_lat = 150_000u64; // 150 us
        let mut t = 0;
        let mut run = |c: &mut ReadChooser, local_lat: u64, n: u64| {
            let mut on_local = 0;
            for _ in 0..n {
                t += 10_000;
                let ch = c.choose(t, &[true, true]).unwrap();
                let lat = if ch.path == 0 { local_lat } else { mirror_lat };
                on_local += u64::from(ch.path == 0);
                c.record(ch.path, t + lat, lat);
            }
            on_local
        };
        let healthy = run(&mut c, local_lat, 1000);
        assert!(healthy > 950, "healthy: {healthy} of 1000 local");
        local_lat = 2 * MS; // fault: 2 ms reads
        let slow = run(&mut c, local_lat, 1000);
        assert!(slow < 60, "slow disk: {slow} of 1000 local");
        local_lat = 20_000; // healed
        let healed = run(&mut c, local_lat, 1000);
        assert!(healed > 700, "healed: {healed} of 1000 local");
    }

    #[test]
    fn an_error_moves_reads_away() {
        let mut c = ReadChooser::new(2, no_probes());
        c.record(0, 0, 100_000);
        c.record(1, 0, 10_000);
        assert_eq!(c.choose(1, &[true, true]).unwrap().path, 1);
        c.record_error(1, 2);
        assert_eq!(c.choose(3, &[true, true]).unwrap().path, 0);
    }

    #[test]
    fn a_late_sample_counts_as_several_but_is_bounded() {
        let mut c = ReadChooser::new(2, no_probes());
        c.record(0, 0, 1000);
        c.record(1, 0, 1000);
        for t in 1..=100 {
            let ch = c.choose(t, &[true, true]).unwrap();
            c.record(ch.path, t, 1000);
        }
        // Path 1 was not chosen for 100 reads: its next sample counts as
        // MAX_CATCH_UP ordinary ones, not as 100.
        c.record(1, 101, 0);
        let w = 1.0 - (1.0 - 1.0 / 8.0f64).powi(MAX_CATCH_UP as i32);
        let e = c.estimate(1).unwrap().ewma_ns.unwrap();
        assert!((e - 1000.0 * (1.0 - w)).abs() < 1e-6, "{e}");
        // The path just sampled takes an ordinary weight.
        c.choose(102, &[true, true]);
        c.record(0, 102, 0);
        let e0 = c.estimate(0).unwrap().ewma_ns.unwrap();
        assert!((e0 - 875.0).abs() < 1e-6, "{e0}");
    }

    #[test]
    #[should_panic(expected = "probe_every")]
    fn probing_every_read_is_refused() {
        let _ = ReadChooser::new(
            2,
            ChooserConfig {
                probe_every: 1,
                ..ChooserConfig::default()
            },
        );
    }

    #[test]
    #[should_panic(expected = "EWMA weight")]
    fn a_zero_weight_is_refused() {
        let _ = ReadChooser::new(
            2,
            ChooserConfig {
                weight: 0.0,
                ..ChooserConfig::default()
            },
        );
    }

    proptest! {
        /// Whatever the samples and eligibility: the choice is eligible,
        /// every average stays within the samples it was fed, and without
        /// probes a known best path is what is chosen.
        #[test]
        fn choices_are_eligible_and_averages_bounded(
            paths in 1usize..5,
            steps in proptest::collection::vec(
                (proptest::collection::vec(any::<bool>(), 5), 1u64..10_000_000, any::<bool>()),
                1..300,
            ),
            probe_every in 0u64..8,
        ) {
            let probe_every = if probe_every == 1 { 0 } else { probe_every };
            let cfg = ChooserConfig { probe_every, max_age_ns: 50 * MS, ..ChooserConfig::default() };
            let mut c = ReadChooser::new(paths, cfg);
            let mut bounds = vec![(u64::MAX, 0u64); paths];
            let mut t = 0u64;
            for (elig, lat, fail) in steps {
                t += lat;
                let elig = &elig[..paths];
                let before = c.clone();
                match c.choose(t, elig) {
                    None => prop_assert!(!elig.iter().any(|&e| e)),
                    Some(ch) => {
                        prop_assert!(elig[ch.path]);
                        if !ch.probe {
                            // Not a probe: no eligible path is known to be faster.
                            for (i, &e) in elig.iter().enumerate() {
                                if e {
                                    prop_assert!(before.ewma(ch.path) <= before.ewma(i));
                                }
                            }
                        }
                        let s = if fail { cfg.error_penalty_ns } else { lat };
                        if fail { c.record_error(ch.path, t) } else { c.record(ch.path, t, lat) }
                        let b = &mut bounds[ch.path];
                        *b = (b.0.min(s), b.1.max(s));
                    }
                }
                for (i, &(lo, hi)) in bounds.iter().enumerate() {
                    if let Some(e) = c.estimate(i).unwrap().ewma_ns {
                        prop_assert!(e >= lo as f64 - 1e-6 && e <= hi as f64 + 1e-6);
                    }
                }
            }
        }

        /// With probes by count, no eligible path goes unmeasured for more
        /// than (paths - 1) * probe_every reads in a row.
        #[test]
        fn every_eligible_path_is_sampled_regularly(
            lats in proptest::collection::vec(1u64..1_000_000, 2..5),
            probe_every in 2u64..16,
        ) {
            let n = lats.len();
            let cfg = ChooserConfig { probe_every, ..by_count() };
            let mut c = ReadChooser::new(n, cfg);
            let all = vec![true; n];
            let mut last = vec![0u64; n];
            let bound = (n as u64 - 1) * probe_every + n as u64;
            for r in 1..=(bound * 8) {
                let ch = c.choose(r, &all).unwrap();
                c.record(ch.path, r, lats[ch.path]);
                last[ch.path] = r;
                for (i, &l) in last.iter().enumerate() {
                    prop_assert!(r - l <= bound, "path {} unsampled since read {} (now {})", i, l, r);
                }
            }
        }
    }
}
