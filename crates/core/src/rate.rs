//! A token bucket for the resync copy: `rate` bytes per second on average,
//! bursts of at most `burst` bytes, adjustable while running. Time is passed
//! in (nanoseconds on any monotonic clock), so it is tested without sleeping.

/// Token bucket state. A rate of 0 means unlimited.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    burst: u64,
    /// Bytes that may go now; negative when a taken chunk is still owed.
    tokens: f64,
    last_ns: u64,
}

impl TokenBucket {
    /// A full bucket at time `now_ns`.
    pub fn new(rate: u64, burst: u64, now_ns: u64) -> Self {
        Self {
            rate,
            burst: burst.max(1),
            tokens: burst.max(1) as f64,
            last_ns: now_ns,
        }
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Changes the rate from `now_ns` on (what accrued so far is kept).
    pub fn set_rate(&mut self, rate: u64, now_ns: u64) {
        self.refill(now_ns);
        self.rate = rate;
        if rate == 0 {
            self.tokens = self.burst as f64;
        }
    }

    fn refill(&mut self, now_ns: u64) {
        let dt = now_ns.saturating_sub(self.last_ns);
        self.last_ns = self.last_ns.max(now_ns);
        if self.rate > 0 {
            self.tokens = (self.tokens + dt as f64 * self.rate as f64 / 1e9).min(self.burst as f64);
        }
    }

    /// Takes `n` bytes at `now_ns`; returns how many nanoseconds the caller
    /// must wait before sending them (0: at once). The bytes are owed even
    /// while the caller waits, so the average rate holds for any chunk size.
    pub fn take(&mut self, n: u64, now_ns: u64) -> u64 {
        if self.rate == 0 {
            return 0;
        }
        self.refill(now_ns);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            0
        } else {
            (-self.tokens * 1e9 / self.rate as f64).ceil() as u64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn unlimited_never_waits() {
        let mut b = TokenBucket::new(0, 1 << 20, 0);
        for i in 0..1000 {
            assert_eq!(b.take(1 << 30, i), 0);
        }
    }

    #[test]
    fn waits_for_what_is_owed_and_rate_changes_apply() {
        // 1 MiB/s, 1 MiB burst: the first MiB goes at once, the next waits 1 s.
        let mut b = TokenBucket::new(1 << 20, 1 << 20, 0);
        assert_eq!(b.take(1 << 20, 0), 0);
        assert_eq!(b.take(1 << 20, 0), 1_000_000_000);
        // Ten times faster from now: the debt is paid ten times sooner.
        let mut b = TokenBucket::new(1 << 20, 1 << 20, 0);
        b.take(2 << 20, 0);
        b.set_rate(10 << 20, 0);
        assert_eq!(b.take(0, 0), 100_000_000);
        // Unlimited again: no wait, whatever was owed.
        b.set_rate(0, 0);
        assert_eq!(b.take(1 << 30, 0), 0);
    }

    proptest! {
        /// Following the waits it returns, a caller never sends more than
        /// rate * elapsed + burst bytes.
        #[test]
        fn average_rate_holds(rate in 1u64..1_000_000_000, burst in 1u64..(64 << 20),
                              chunks in proptest::collection::vec(1u64..(8 << 20), 1..200)) {
            let mut b = TokenBucket::new(rate, burst, 0);
            let mut now = 0u64;
            let mut sent = 0u64;
            for n in chunks {
                now += b.take(n, now);
                sent += n;
                let allowed = rate as f64 * now as f64 / 1e9 + burst as f64;
                prop_assert!(sent as f64 <= allowed + 1.0, "sent {} allowed {}", sent, allowed);
            }
        }
    }
}
