//! Bytes of writes the peer lacks, for `syncblock status`.

use std::collections::VecDeque;

/// Samples the replication-lag tracker keeps; beyond that it halves its resolution, so the lag in
/// bytes of a peer more than this many writes behind is an over-estimate by at most one gap.
const LAG_SAMPLES_MAX: usize = 1 << 14;

/// Bytes of writes the peer lacks: cumulative write bytes sampled by tag, so the lag in bytes is
/// the total minus the cumulative count at the peer's applied tag. Samples are dropped once the
/// peer has them durably (it never goes back below that, even across a reconnection). Exact while
/// the peer is fewer than `LAG_SAMPLES_MAX` writes behind; beyond, samples are `stride` tags
/// apart and the figure over-estimates by at most that many writes.
pub(super) struct Lag {
    /// (tag, cumulative bytes through that tag), increasing.
    samples: VecDeque<(u64, u64)>,
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
    pub(super) fn wrote(&mut self, tag: u64, bytes: u64) {
        self.total += bytes;
        let n = self.samples.len();
        if n >= 2 && self.samples[n - 1].0 - self.samples[n - 2].0 < self.stride {
            // The newest sample still spans less than a stride: it moves up to this write.
            self.samples[n - 1] = (tag, self.total);
        } else {
            self.samples.push_back((tag, self.total));
        }
        if self.samples.len() > LAG_SAMPLES_MAX {
            // Every second sample (and the newest) stays: half the resolution, never an
            // under-estimate.
            let last = self.samples.len() - 1;
            let kept: VecDeque<_> =
                self.samples.iter().enumerate().filter(|(k, _)| k % 2 == 1 || *k == last).map(|(_, s)| *s).collect();
            self.samples = kept;
            self.stride *= 2;
        }
    }

    pub(super) fn durable_through(&mut self, tag: u64) {
        while let Some(&(t, cum)) = self.samples.front() {
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
        let k = self.samples.partition_point(|&(t, _)| t <= applied);
        let through = if k == 0 { self.base } else { self.samples[k - 1].1 };
        self.total - through
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_counts_the_bytes_of_writes_after_the_applied_tag() {
        let mut lag = Lag::default();
        for tag in 1..=10 {
            lag.wrote(tag, 100);
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
            lag.wrote(tag, 1);
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
}
