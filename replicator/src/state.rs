//! A replicated volume's persistent replication state (kept in the engine's per-volume attribute,
//! so it changes in log order with the data) and how it and the trim floor are recorded, and the
//! log-matching rule that finds the last point two replicas' histories share.

use std::time::Duration;

use syncblock_engine::{Epoch, StagedOp, Store, VolumeId, VolumeInfo, KEEP_LAST_TAG};
use tokio::time::Instant;

use crate::wire::{EpochStart, HISTORY_MAX};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Secondary,
}

/// Persistent replication state of one volume on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplState {
    pub role: Role,
    /// Highest epoch this node has seen; it refuses primaries of a lower one.
    pub epoch: Epoch,
    /// False while a resync is half-applied: the image is then not a prefix of any history, and the
    /// node must not be promoted.
    pub consistent: bool,
    /// Where each epoch's tags start, oldest first (at most `HISTORY_MAX`).
    pub history: Vec<EpochStart>,
    /// The pair this replica belongs to: drawn by the pair's first primary, taken by its
    /// secondary at the first sync, fixed from then on. 0: not part of a pair yet. The witness
    /// keys its records by it, and a secondary refuses a primary of another pair.
    pub pair: u64,
}

/// 3: the pair id follows the history (8 bytes). 2: history entries carry their origin (24 bytes
/// each). Versions 1 (16-byte entries, origin 0) and 2 are still read, with pair id 0.
const ATTR_VERSION: u8 = 3;

impl ReplState {
    pub fn new(role: Role) -> ReplState {
        ReplState { role, epoch: Epoch(0), consistent: true, history: Vec::new(), pair: 0 }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![ATTR_VERSION, self.role as u8, self.consistent as u8, 0];
        b.extend_from_slice(&self.epoch.0.to_le_bytes());
        let h = &self.history[self.history.len().saturating_sub(HISTORY_MAX)..];
        b.extend_from_slice(&(h.len() as u32).to_le_bytes());
        for e in h {
            b.extend_from_slice(&e.epoch.0.to_le_bytes());
            b.extend_from_slice(&e.start_tag.to_le_bytes());
            b.extend_from_slice(&e.origin.to_le_bytes());
        }
        b.extend_from_slice(&self.pair.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<ReplState> {
        if b.len() < 16 || !(1..=ATTR_VERSION).contains(&b[0]) {
            return None;
        }
        let entry = if b[0] == 1 { 16 } else { 24 };
        let role = match b[1] {
            0 => Role::Primary,
            1 => Role::Secondary,
            _ => return None,
        };
        let epoch = Epoch(u64::from_le_bytes(b[4..12].try_into().ok()?));
        let n = u32::from_le_bytes(b[12..16].try_into().ok()?) as usize;
        let tail = if b[0] >= 3 { 8 } else { 0 };
        if n > HISTORY_MAX || b.len() != 16 + entry * n + tail {
            return None;
        }
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8"));
        let history = (0..n)
            .map(|i| {
                let at = 16 + entry * i;
                EpochStart {
                    epoch: Epoch(u64_at(at)),
                    start_tag: u64_at(at + 8),
                    origin: if entry == 24 { u64_at(at + 16) } else { 0 },
                }
            })
            .collect();
        let pair = if tail == 8 { u64_at(16 + entry * n) } else { 0 };
        Some(ReplState { role, epoch, consistent: b[2] != 0, history, pair })
    }

    /// Starts epoch `epoch` as primary at `next_tag`; `origin` tells this start apart from any
    /// other of the same epoch number (see [`EpochStart`]).
    pub fn begin_epoch(&mut self, epoch: Epoch, next_tag: u64, origin: u64) {
        self.role = Role::Primary;
        self.epoch = epoch;
        self.history.retain(|e| e.start_tag < next_tag);
        self.history.push(EpochStart { epoch, start_tag: next_tag, origin });
        let excess = self.history.len().saturating_sub(HISTORY_MAX);
        self.history.drain(..excess);
    }
}

/// Records `state` for the volume `info` describes as a node takes its role, keeping the volume's
/// last tag and its trim floor (never above that tag); `staged` says what becomes of a resync
/// staged on it. Returns the floor recorded.
pub(crate) async fn record_state(
    store: &Store,
    info: &VolumeInfo,
    state: &ReplState,
    staged: StagedOp,
) -> syncblock_engine::Result<u64> {
    let floor = info.trim_floor.min(info.last_tag);
    store.set_repl_staged(info.id, KEEP_LAST_TAG, floor, state.encode(), staged).await?;
    Ok(floor)
}

/// Trim-floor updates (a meta record each) are written at most this often.
pub(crate) const FLOOR_PERIOD: Duration = Duration::from_secs(5);

/// When a node records a raised trim floor. Trims above the floor are retained for a future
/// resync, so the floor should follow what both replicas hold; but each record is a meta record in
/// the log, so it is written at most once a [`FLOOR_PERIOD`], and one at a time. The primary
/// raises it to what both nodes made durable, the secondary to what the primary's heartbeats
/// allow; both record it through here ([`FloorRecord::due`], [`FloorRecord::record`]).
#[derive(Debug)]
pub(crate) struct FloorRecord {
    /// The floor last recorded.
    recorded: u64,
    /// No record before this: one period after the last.
    next_at: Instant,
    /// A record is being written.
    writing: bool,
}

impl FloorRecord {
    /// `recorded` is the floor the volume holds; the first update waits a period from `now`.
    pub fn new(recorded: u64, now: Instant) -> FloorRecord {
        FloorRecord { recorded, next_at: now + FLOOR_PERIOD, writing: false }
    }

    /// The floor to record now, if `want` is above the last one recorded, a period has passed
    /// since then and no record is being written. The caller then writes it ([`FloorRecord::record`])
    /// and reports how that went ([`FloorRecord::written`]).
    pub fn due(&mut self, want: u64, now: Instant) -> Option<u64> {
        if want <= self.recorded || now < self.next_at || self.writing {
            return None;
        }
        self.writing = true;
        self.next_at = now + FLOOR_PERIOD;
        Some(want)
    }

    /// Writes `floor` as `volume`'s trim floor, with the replication state `attr`, keeping its
    /// last tag.
    pub async fn record(store: &Store, volume: VolumeId, floor: u64, attr: Vec<u8>) -> syncblock_engine::Result<()> {
        store.set_repl(volume, KEEP_LAST_TAG, floor, attr).await
    }

    /// The record of `floor` that [`FloorRecord::due`] asked for ended; `ok` if it was written.
    pub fn written(&mut self, floor: u64, ok: bool) {
        self.writing = false;
        if ok {
            self.recorded = self.recorded.max(floor);
        }
    }

    /// The floor was recorded as `floor` by another record (a resync's commit resets it to 0).
    pub fn reset(&mut self, floor: u64) {
        self.recorded = floor;
    }
}

/// Whether a volume's committed image is a consistent replica: no resync is half-applied to it.
/// A resync stages its writes in the engine until it commits, so an interrupted one leaves the
/// committed image as it was, unless it outgrew staging (then the engine reports an overflow and
/// the image is inconsistent until a resync commits).
pub fn consistent_replica(info: &syncblock_engine::VolumeInfo) -> bool {
    ReplState::decode(&info.attr).is_none_or(|s| s.consistent) || !info.resync_overflowed
}

/// The epoch whose primary assigned `tag` in `history`, or None if the history does not reach back
/// that far (or `tag` is 0, the empty prefix).
fn covering(history: &[EpochStart], tag: u64) -> Option<EpochStart> {
    history.iter().rev().find(|e| e.start_tag <= tag).copied().filter(|_| tag > 0)
}

/// The last tag both replicas hold the same history up to: tags are assigned by one primary per
/// epoch, so two replicas that hold tag `t` from the same epoch hold the same writes up to `t` (the
/// log-matching argument of Raft). "The same epoch" is the same number *and* origin: two starts of
/// one number without a witness are different histories. Returns 0 when they share nothing.
pub fn common_point(a: &[EpochStart], a_last: u64, b: &[EpochStart], b_last: u64) -> u64 {
    let mut t = a_last.min(b_last);
    // Each step moves `t` below the start of at least one epoch entry, so this ends.
    for _ in 0..=2 * HISTORY_MAX + 2 {
        if t == 0 {
            return 0;
        }
        match (covering(a, t), covering(b, t)) {
            (Some(x), Some(y)) if x.same_epoch(&y) => return t,
            (Some(x), Some(y)) => t = x.start_tag.max(y.start_tag) - 1,
            // One history does not reach back to `t`: nothing provably shared there.
            (None, Some(y)) => t = y.start_tag.min(t) - 1,
            (Some(x), None) => t = x.start_tag.min(t) - 1,
            (None, None) => return 0,
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entries whose origin is their epoch number: one start per epoch, as with a witness.
    fn h(v: &[(u64, u64)]) -> Vec<EpochStart> {
        v.iter().map(|&(epoch, start_tag)| EpochStart { epoch: Epoch(epoch), start_tag, origin: epoch }).collect()
    }

    #[test]
    fn state_round_trips() {
        let mut s = ReplState::new(Role::Secondary);
        s.begin_epoch(Epoch(4), 10, 0xfeed);
        s.consistent = false;
        s.pair = 0x1234_5678_9abc;
        assert_eq!(ReplState::decode(&s.encode()), Some(s.clone()));
        // Version 2 (no pair id) is read with pair 0.
        let mut v2 = s.encode();
        v2[0] = 2;
        v2.truncate(v2.len() - 8);
        assert_eq!(ReplState::decode(&v2), Some(ReplState { pair: 0, ..s }));
        assert_eq!(ReplState::decode(&[9; 3]), None);
    }

    #[test]
    fn version_1_state_is_read_with_origin_zero() {
        let mut b = vec![1, 1, 1, 0];
        b.extend_from_slice(&5u64.to_le_bytes());
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&5u64.to_le_bytes());
        b.extend_from_slice(&40u64.to_le_bytes());
        let s = ReplState::decode(&b).unwrap();
        assert_eq!((s.role, s.epoch, s.consistent), (Role::Secondary, Epoch(5), true));
        assert_eq!(s.history, vec![EpochStart { epoch: Epoch(5), start_tag: 40, origin: 0 }]);
        b.push(0);
        assert_eq!(ReplState::decode(&b), None, "a length that fits neither entry size");
    }

    #[test]
    fn two_starts_of_one_epoch_number_share_nothing_after_their_start() {
        // Without a witness: A restarted as primary of epoch 2 at tag 51 while B, promoted by hand,
        // took epoch 2 at tag 51 as well. Their tags from 51 on are different writes.
        let a = vec![
            EpochStart { epoch: Epoch(1), start_tag: 1, origin: 9 },
            EpochStart { epoch: Epoch(2), start_tag: 51, origin: 100 },
        ];
        let b = vec![
            EpochStart { epoch: Epoch(1), start_tag: 1, origin: 9 },
            EpochStart { epoch: Epoch(2), start_tag: 51, origin: 200 },
        ];
        assert_eq!(common_point(&a, 60, &b, 70), 50);
        assert_eq!(common_point(&b, 70, &a, 60), 50);
        assert_eq!(common_point(&a, 60, &a, 70), 60, "the same start is shared");
    }

    #[test]
    fn same_history_shares_the_shorter_prefix() {
        let a = h(&[(1, 1)]);
        assert_eq!(common_point(&a, 100, &a, 80), 80);
        assert_eq!(common_point(&a, 0, &a, 80), 0);
    }

    #[test]
    fn a_deposed_primarys_unreplicated_tail_is_not_shared() {
        // A was primary in epoch 1 and wrote up to 120; B received up to 110, was promoted in epoch
        // 2 at tag 111 and wrote up to 130. They share exactly 1..=110.
        let a = h(&[(1, 1)]);
        let b = h(&[(1, 1), (2, 111)]);
        assert_eq!(common_point(&a, 120, &b, 130), 110);
        assert_eq!(common_point(&b, 130, &a, 120), 110);
        // Promoted without having received anything.
        let b = h(&[(2, 1)]);
        assert_eq!(common_point(&a, 120, &b, 5), 0);
    }

    #[test]
    fn an_empty_history_shares_nothing_but_the_empty_prefix() {
        assert_eq!(common_point(&[], 50, &h(&[(1, 1)]), 50), 0);
    }

    #[test]
    fn trim_floor_is_recorded_once_a_period_one_record_at_a_time() {
        let t0 = Instant::now();
        let mut f = FloorRecord::new(10, t0);
        assert_eq!(f.due(20, t0), None, "the first record waits a period");
        let t1 = t0 + FLOOR_PERIOD;
        assert_eq!(f.due(10, t1), None, "not above the floor recorded");
        assert_eq!(f.due(20, t1), Some(20));
        let t2 = t1 + FLOOR_PERIOD;
        assert_eq!(f.due(30, t2), None, "one record at a time");
        f.written(20, false);
        assert_eq!(f.due(30, t2), Some(30), "a failed record is tried again");
        f.written(30, true);
        assert_eq!(f.due(30, t2 + FLOOR_PERIOD), None);
        f.reset(0);
        assert_eq!(f.due(5, t2 + FLOOR_PERIOD), Some(5), "a commit's reset floor is raised again");
    }
}
