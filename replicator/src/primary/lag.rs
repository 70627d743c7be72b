//! Bytes of writes the peer lacks, and since when, for `syncblock status` and the metrics.

use std::collections::VecDeque;

use tokio::time::Instant;

/// Samples the replication-lag tracker keeps; beyond that it halves its resolution, so the lag in
/// bytes of a peer more than this many writes behind is an over-estimate by at most one gap.
const LAG_SAMPLES_MAX: usize = 1 << 14;

/// Bytes of writes the peer lacks: cumulative write bytes sampled by tag, so the lag in bytes is
/// the total minus the cumulative count at the peer's applied tag. Each sample also keeps when the
/// first write it spans was made, so the lag in time is the age of the oldest write the peer lacks
/// (never an under-estimate either). Samples are dropped once the
/// peer has them durably (it never goes back below that, even across a reconnection). Exact while
/// the peer is fewer than `LAG_SAMPLES_MAX` writes behind; beyond, samples are `stride` tags
/// apart and the figure over-estimates by at most that many writes.
pub(super) struct Lag {
    /// (tag, cumulative bytes through that tag, when the first write the sample spans was
    /// made), increasing.
    samples: VecDeque<(u64, u64, Instant)>,
    /// Cumulative bytes through the last dropped sample.
    base: u64,
    total: u64,
    /// Tags one sample may span.
    stride: u64,
}

impl Default for Lag {
    fn default() -> Lag {
        Lag { samples: VecDeque::new(), base: 0, total: 0, stride: 1 }
    }
}

impl Lag {
    pub(super) fn wrote(&mut self, tag: u64, bytes: u64, at: Instant) {
        self.total += bytes;
        let n = self.samples.len();
        if n >= 2 && self.samples[n - 1].0 - self.samples[n - 2].0 < self.stride {
            // The newest sample still spans less than a stride: it moves up to this write (and
            // keeps the time of its first).
            let first = self.samples[n - 1].2;
            self.samples[n - 1] = (tag, self.total, first);
        } else {
            self.samples.push_back((tag, self.total, at));
        }
        if self.samples.len() > LAG_SAMPLES_MAX {
            // Every second sample (and the newest) stays, taking over the span of the one
            // before it and so its older time: half the resolution, never an under-estimate.
            let last = self.samples.len() - 1;
            let mut kept = VecDeque::with_capacity(self.samples.len() / 2 + 1);
            let mut first = None;
            for (k, &(tag, cum, at)) in self.samples.iter().enumerate() {
                let first_at = *first.get_or_insert(at);
                if k % 2 == 1 || k == last {
                    kept.push_back((tag, cum, first_at));
                    first = None;
                }
            }
            self.samples = kept;
            self.stride *= 2;
        }
    }

    pub(super) fn durable_through(&mut self, tag: u64) {
        while let Some(&(t, cum, _)) = self.samples.front() {
            if t > tag {
                break;
            }
            self.base = cum;
            self.samples.pop_front();
        }
        if self.samples.is_empty() {
            self.stride = 1;
        }
    }

    pub(super) fn bytes_after(&self, applied: u64) -> u64 {
        let k = self.samples.partition_point(|&(t, _, _)| t <= applied);
        let through = if k == 0 { self.base } else { self.samples[k - 1].1 };
        self.total - through
    }

    /// When the oldest write after `applied` was made (at or before: a sample spanning several
    /// writes gives the time of its first), or None if the peer has every write.
    pub(super) fn oldest_after(&self, applied: u64) -> Option<Instant> {
        let k = self.samples.partition_point(|&(t, _, _)| t <= applied);
        self.samples.get(k).map(|s| s.2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_counts_the_bytes_of_writes_after_the_applied_tag() {
        let mut lag = Lag::default();
        for tag in 1..=10 {
            lag.wrote(tag, 100, Instant::now());
        }
        assert_eq!(lag.bytes_after(0), 1000);
        assert_eq!(lag.bytes_after(4), 600);
        lag.durable_through(3);
        assert_eq!(lag.bytes_after(3), 700);
        // A reconnection may report an applied tag back at the durable point: still exact.
        assert_eq!(lag.bytes_after(5), 500);
        assert_eq!(lag.bytes_after(10), 0);
        // Far behind: coarser samples, bounded memory, never an under-estimate.
        let mut lag = Lag::default();
        for tag in 1..=(4 * LAG_SAMPLES_MAX as u64) {
            lag.wrote(tag, 1, Instant::now());
        }
        assert!(lag.samples.len() <= LAG_SAMPLES_MAX);
        let total = 4 * LAG_SAMPLES_MAX as u64;
        for applied in [0, 1, 1000, total / 2, total - 1, total] {
            let got = lag.bytes_after(applied);
            assert!(got >= total - applied && got <= total - applied + 2 * lag.stride, "applied {applied}: {got}");
        }
        assert!(lag.stride <= 16, "{}", lag.stride);
        lag.durable_through(total);
        assert_eq!((lag.bytes_after(total), lag.stride), (0, 1));
    }

    #[test]
    fn the_lag_in_time_is_the_age_of_the_oldest_write_the_peer_lacks() {
        let t0 = Instant::now();
        let at = |k: u64| t0 + std::time::Duration::from_millis(k);
        let mut lag = Lag::default();
        assert_eq!(lag.oldest_after(0), None);
        for tag in 1..=10 {
            lag.wrote(tag, 100, at(tag));
        }
        assert_eq!(lag.oldest_after(0), Some(at(1)));
        assert_eq!(lag.oldest_after(6), Some(at(7)));
        assert_eq!(lag.oldest_after(10), None, "the peer has every write");
        lag.durable_through(4);
        assert_eq!(lag.oldest_after(4), Some(at(5)));
        // Far behind: a sample spanning several writes gives its first write's time, so the age
        // is never under-estimated.
        let mut lag = Lag::default();
        let n = 4 * LAG_SAMPLES_MAX as u64;
        for tag in 1..=n {
            lag.wrote(tag, 1, at(tag));
        }
        for applied in [0, 1, 1000, n / 2, n - 1] {
            let oldest = lag.oldest_after(applied).unwrap();
            assert!(oldest <= at(applied + 1), "applied {applied}");
            assert!(oldest >= at((applied + 1).saturating_sub(2 * lag.stride)), "applied {applied}");
        }
    }
}
