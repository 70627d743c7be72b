//! Random choices for the process tests, from a seed that is printed and can be given back
//! through an environment variable, so a failing run can be repeated.

use std::time::Duration;

/// xorshift64, seeded from `var` if set, else from the clock.
pub struct Rng(u64);

impl Rng {
    /// Prints the seed under `what`, with how to repeat it.
    pub fn from_env(var: &str, what: &str) -> Rng {
        let seed = std::env::var(var).ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64
        });
        eprintln!("{what}: seed {seed} ({var}={seed} repeats the choices)");
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A duration in [lo_ms, hi_ms).
    pub fn millis(&mut self, lo_ms: u64, hi_ms: u64) -> Duration {
        Duration::from_millis(lo_ms + self.next() % (hi_ms - lo_ms))
    }
}
