//! What the primary publishes about itself and its peer: progress of long passes, verify reports,
//! the peer as the primary sees it, and the status snapshot. Plain data, written only by the
//! primary's owner loop (`owner.rs`).

use std::time::Duration;

use syncblock_engine::{ByteRange, Epoch};
use tokio::time::Instant;

/// Progress of a long pass over a volume (a resync or a verify), for `syncblock status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    pub bytes_total: u64,
    /// Bytes examined so far: compared and skipped, trimmed, or shipped.
    pub bytes_done: u64,
    pub started: Option<Instant>,
    /// When the pass finished or failed.
    pub ended: Option<Instant>,
}

impl Progress {
    pub(super) fn begin(bytes_total: u64) -> Progress {
        Progress { bytes_total, bytes_done: 0, started: Some(Instant::now()), ended: None }
    }

    pub(super) fn end(&mut self) {
        if self.active() {
            self.ended = Some(Instant::now());
        }
    }

    pub fn active(&self) -> bool {
        self.started.is_some() && self.ended.is_none()
    }

    /// Time spent, up to `now` while running.
    pub fn elapsed_at(&self, now: Instant) -> Duration {
        match self.started {
            Some(s) => self.ended.unwrap_or(now).saturating_duration_since(s),
            None => Duration::ZERO,
        }
    }

    /// Average rate since the start.
    pub fn rate_bytes_per_sec_at(&self, now: Instant) -> u64 {
        let secs = self.elapsed_at(now).as_secs_f64();
        if secs > 0.0 {
            (self.bytes_done as f64 / secs) as u64
        } else {
            0
        }
    }

    /// Time left at the average rate; None when not running or nothing is done yet.
    pub fn eta_at(&self, now: Instant) -> Option<Duration> {
        let rate = self.rate_bytes_per_sec_at(now);
        (self.active() && rate > 0)
            .then(|| Duration::from_secs_f64(self.bytes_total.saturating_sub(self.bytes_done) as f64 / rate as f64))
    }
}

/// What a verify pass found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub bytes_compared: u64,
    /// Blocks whose checksum or mapping differs between the replicas.
    pub blocks_differing: u64,
    /// The differing ranges as (byte offset, byte length), in order, merged; at most
    /// `VERIFY_RANGES_MAX` of them (`ranges_truncated` says when more were found).
    pub ranges: Vec<ByteRange>,
    pub ranges_truncated: bool,
    /// Blocks rewritten (or trimmed) on the peer from the primary's copy, with `repair`.
    pub blocks_repaired: u64,
    pub elapsed: Duration,
}

/// What the primary knows of its peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerView {
    pub connected: bool,
    /// Resync finished: the peer is a consistent, up-to-date copy, and RPO = 0 holds.
    pub in_sync: bool,
    /// Every tag up to this is in the peer's log.
    pub applied: u64,
    /// Every tag up to this is durable on the peer.
    pub durable: u64,
    /// The newest ping the peer answered (nonces increase for the primary's lifetime).
    pub pong: u64,
    pub last_error: Option<String>,
    /// The current (or last) resync: its `bytes_total` is the ranges it covers.
    pub resync: Progress,
    /// The current (or last) resync is a full sync (no shared history), comparing checksums.
    pub resync_full: bool,
    /// Data bytes the resync shipped, and bytes it skipped because the peer's checksums matched.
    pub resync_bytes_shipped: u64,
    pub resync_bytes_skipped: u64,
    pub resyncs: u64,
    /// The current (or last) verify pass, and the last completed one's findings.
    pub verify: Progress,
    pub last_verify: Option<VerifyReport>,
    /// First tag streamed on the current link. Older tags reach the peer through the resync, so
    /// until it commits only writes from here on can be confirmed.
    pub streamed_from: u64,
    /// The witness consented to acknowledging writes without the peer (`degrade` policy).
    pub solo: bool,
    /// Another node holds the primary role in a newer epoch: this one must stop.
    pub deposed: Option<String>,
}

impl PeerView {
    /// Whether an operation with `tag` may complete: the peer has it in its log (and, for a
    /// durable one, on stable storage, with no half-finished resync before it).
    pub fn confirms(&self, tag: u64, durable: bool) -> bool {
        if self.solo {
            return true;
        }
        if durable {
            self.in_sync && self.durable >= tag
        } else {
            self.applied >= tag && (self.in_sync || (self.connected && tag >= self.streamed_from))
        }
    }
}

/// A snapshot for `syncblock status`.
#[derive(Debug, Clone)]
pub struct PrimaryStatus {
    pub volume: String,
    pub epoch: Epoch,
    pub policy: crate::Policy,
    /// Client operations waiting for the peer's confirmation, and how long the oldest has waited.
    pub waiting: usize,
    pub waiting_oldest: Option<Duration>,
    pub last_tag: u64,
    /// Bytes of writes the peer does not have in its log yet (see `Lag`).
    pub lag_bytes: u64,
    /// How long ago the oldest of those writes was made (None: the peer has every write).
    pub lag_age: Option<Duration>,
    /// Whether the witness answered the last request this primary sent it, and why not (None
    /// without a witness).
    pub witness: Option<Result<(), String>>,
    /// Where answered operations spent their time.
    pub stages: super::Stages,
    pub peer: PeerView,
}

impl PrimaryStatus {
    /// Writes the primary holds that its peer does not have in its log yet.
    pub fn lag_tags(&self) -> u64 {
        self.last_tag.saturating_sub(self.peer.applied)
    }

    /// Whether every acknowledged write is on both nodes right now.
    pub fn rpo_zero(&self) -> bool {
        self.peer.connected && self.peer.in_sync && !self.peer.solo
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_rate_and_eta() {
        let t0 = Instant::now();
        let mut p = Progress { bytes_total: 1000, bytes_done: 250, started: Some(t0), ended: None };
        let now = t0 + Duration::from_secs(5);
        assert_eq!(p.rate_bytes_per_sec_at(now), 50);
        assert_eq!(p.eta_at(now), Some(Duration::from_secs(15)));
        p.bytes_done = 0;
        assert_eq!(p.eta_at(now), None, "no rate yet");
        p.bytes_done = 1000;
        p.ended = Some(t0 + Duration::from_secs(10));
        assert!(!p.active());
        assert_eq!(p.elapsed_at(now + Duration::from_secs(100)), Duration::from_secs(10));
        assert_eq!(p.rate_bytes_per_sec_at(now), 100);
        assert_eq!(p.eta_at(now), None, "finished");
        assert_eq!(Progress::default().rate_bytes_per_sec_at(now), 0);
    }
}
