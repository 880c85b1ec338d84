//! Per-connection flood control: token buckets over what a client asks for.
//!
//! The rate lives in the config and the bucket in the connection, so an idle
//! connection pays 16 bytes per bucket.

/// A sustained rate with bursts above it; `per_second == 0` means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

/// One connection's allowance under one [`Rate`].
pub struct TokenBucket {
    tokens: f32,
    /// Milliseconds (on the hub's clock) of the last refill.
    last_ms: u64,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: Rate, now_ms: u64) -> Self {
        TokenBucket {
            tokens: rate.burst as f32,
            last_ms: now_ms,
        }
    }

    /// Milliseconds until the next token (after a refused `allow`).
    pub fn retry_ms(&self, rate: Rate) -> u64 {
        if rate.per_second == 0 {
            return 0;
        }
        let missing = (1.0 - self.tokens).max(0.0);
        (missing * 1000.0 / rate.per_second as f32).ceil() as u64
    }

    /// Take one token if there is one.
    pub fn allow(&mut self, rate: Rate, now_ms: u64) -> bool {
        if rate.per_second == 0 {
            return true;
        }
        let elapsed = now_ms.saturating_sub(self.last_ms) as f32 / 1000.0;
        self.last_ms = now_ms;
        self.tokens = (self.tokens + elapsed * rate.per_second as f32).min(rate.burst as f32);
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

    #[test]
    fn allows_the_burst_then_the_rate() {
        let rate = Rate {
            per_second: 10,
            burst: 3,
        };
        let mut bucket = TokenBucket::new(rate, 1000);
        assert_eq!((0..5).filter(|_| bucket.allow(rate, 1000)).count(), 3);
        assert!(bucket.allow(rate, 1100));
        assert!(!bucket.allow(rate, 1100));
        assert_eq!(bucket.retry_ms(rate), 100);
        let unlimited = Rate {
            per_second: 0,
            burst: 0,
        };
        assert!(TokenBucket::new(unlimited, 0).allow(unlimited, 0));
    }
}
