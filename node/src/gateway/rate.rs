//! The per-connection rate limit on `send` and `direct`: a token bucket.
//!
//! `rate` tokens per second refill the bucket, which holds up to twice that (the burst). Pure:
//! the caller passes the time, so the rule is tested without a clock.

use std::time::Instant;

/// A token bucket; `rate == 0` turns limiting off.
#[derive(Debug, Clone)]
pub struct RateLimit {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    /// A full bucket for `rate` requests per second with bursts up to `2 * rate`.
    pub fn new(rate: u32, now: Instant) -> RateLimit {
        let rate = f64::from(rate);
        RateLimit {
            rate,
            burst: rate * 2.0,
            tokens: rate * 2.0,
            last: now,
        }
    }

    /// Takes a token if one is left at `now`.
    pub fn allow(&mut self, now: Instant) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn allows_a_burst_of_twice_the_rate_then_the_rate() {
        let start = Instant::now();
        let mut limit = RateLimit::new(10, start);
        let burst = (0..100).filter(|_| limit.allow(start)).count();
        assert_eq!(burst, 20);
        // One second later, ten more.
        let later = start + Duration::from_secs(1);
        let refilled = (0..100).filter(|_| limit.allow(later)).count();
        assert_eq!(refilled, 10);
        // The bucket never holds more than the burst.
        let much_later = later + Duration::from_secs(3600);
        assert_eq!((0..100).filter(|_| limit.allow(much_later)).count(), 20);
    }

    #[test]
    fn zero_turns_limiting_off() {
        let now = Instant::now();
        let mut limit = RateLimit::new(0, now);
        assert!((0..10_000).all(|_| limit.allow(now)));
    }
}
