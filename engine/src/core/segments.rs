//! The segment table: which segments are free, which one the log head writes, which are sealed,
//! being cleaned or waiting to be reused, and the conditions of reuse.
//!
//! Owns the invariant that a segment is reused only when nothing live is in it, every record that
//! superseded its blocks is durable, no read is in flight on it, and it was sealed before the last
//! durable checkpoint (so recovery from that checkpoint never needs its old contents).

use super::*;

/// The segment table and the counts kept beside it.
pub(super) struct Segments {
    pub(super) table: Vec<SegState>,
    /// Segments in `Free`, consulted on every write.
    pub(super) n_free: usize,
    /// Segments in `PendingFree`: the scan for reusable segments runs only when non-zero.
    pub(super) n_pending_free: usize,
    /// What [`Core::step_free`] last scanned under (durable LSN, reuse bound, pending count, low
    /// on space, checkpoint idle); `None` after a segment lost a reader.
    pub(super) free_scan_key: Option<(Lsn, u64, usize, bool, bool)>,
    /// Sequence number the next segment opened gets.
    pub(super) next_seq: u64,
    /// The segment the log head writes, and the next block in it.
    pub(super) open: Option<(u32, u32)>,
    /// Segments whose seq is below this were sealed before the last durable checkpoint's tail.
    pub(super) reuse_below_seq: u64,
}

impl Segments {
    pub(super) fn new(table: Vec<SegState>, next_seq: u64) -> Segments {
        Segments {
            n_free: table.iter().filter(|s| s.status == SegStatus::Free).count(),
            n_pending_free: table.iter().filter(|s| s.status == SegStatus::PendingFree).count(),
            free_scan_key: None,
            table,
            next_seq,
            open: None,
            reuse_below_seq: next_seq,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SegStatus {
    Free,
    /// The log head writes here.
    Open,
    Sealed,
    /// The cleaner is copying its live blocks forward.
    Victim,
    /// Empty, waiting for the conditions of reuse.
    PendingFree,
}

#[derive(Debug, Clone)]
pub(crate) struct SegState {
    pub status: SegStatus,
    pub seq: u64,
    pub used_blocks: u32,
    pub min_data_lsn: u64,
    pub max_data_lsn: u64,
    pub max_lsn: u64,
    /// Sealed batches targeting this segment, not yet applied.
    pub inflight_batches: u32,
    /// Reads in flight on this segment.
    pub readers: u32,
    /// Set when a live block failed its checksum during cleaning: never clean it again.
    pub gc_skip: bool,
    /// Cleaned, yet some blocks stayed live (their copies were superseded by writes not yet
    /// applied, or moved out of a resync's staging by its commit): not chosen again until one of
    /// its blocks dies, so the cleaner does not spin on it.
    pub gc_leftover: bool,
    /// For PendingFree: the LSN that must be durable before reuse.
    pub free_after_lsn: Lsn,
    /// Per volume, the highest tag of a trim entry in this segment (at most
    /// [`TRIM_TAGS_PER_SEGMENT_MAX`]; beyond that one wildcard entry for volume `u32::MAX`).
    pub trim_tags: Vec<(u32, u64)>,
}

/// Volumes whose trim tags a segment tracks one by one. Past this, the segment keeps one wildcard
/// entry with the highest tag, which pins it for every retaining volume: conservative, and it keeps
/// the checkpoint's per-segment record bounded (the slot is sized for this many).
pub const TRIM_TAGS_PER_SEGMENT_MAX: usize = 8;

/// Volume id of the wildcard trim-tag entry.
pub const ANY_VOLUME: u32 = u32::MAX;

impl SegState {
    /// Notes the trim entries of a record written to this segment.
    pub fn note_trims(&mut self, entries: &[Entry]) {
        for e in entries.iter().filter(|e| e.kind == EntryKind::Trim && e.tag != 0) {
            let v = if self.trim_tags.first().is_some_and(|t| t.0 == ANY_VOLUME) { ANY_VOLUME } else { e.volume.0 };
            let n = self.trim_tags.len();
            match self.trim_tags.iter_mut().find(|t| t.0 == v) {
                Some(t) => t.1 = t.1.max(e.tag),
                None if n < TRIM_TAGS_PER_SEGMENT_MAX => self.trim_tags.push((v, e.tag)),
                None => {
                    let max = self.trim_tags.iter().map(|t| t.1).max().unwrap_or(0).max(e.tag);
                    self.trim_tags = vec![(ANY_VOLUME, max)];
                }
            }
        }
    }
}

impl SegState {
    pub fn from_rec(r: &SegmentRec) -> SegState {
        SegState {
            status: if r.used_blocks == 0 { SegStatus::Free } else { SegStatus::Sealed },
            seq: r.seq,
            used_blocks: r.used_blocks,
            min_data_lsn: r.min_data_lsn,
            max_data_lsn: r.max_data_lsn,
            max_lsn: r.max_lsn,
            inflight_batches: 0,
            readers: 0,
            gc_skip: false,
            gc_leftover: false,
            free_after_lsn: Lsn(0),
            trim_tags: r.trim_tags.clone(),
        }
    }
}

impl Core {
    pub(super) fn free_segments(&self) -> usize {
        self.segments.n_free
    }

    /// The segment table agrees with its counts, with the open segment and with the batches and
    /// reads in flight.
    pub(super) fn check_segments(&self) {
        let segs = &self.segments;
        let count = |status| segs.table.iter().filter(|s| s.status == status).count();
        assert_eq!(segs.n_free, count(SegStatus::Free), "free count");
        assert_eq!(segs.n_pending_free, count(SegStatus::PendingFree), "pending-free count");
        let open: Vec<u32> =
            (0..segs.table.len() as u32).filter(|&s| segs.table[s as usize].status == SegStatus::Open).collect();
        assert_eq!(open, segs.open.map(|(s, _)| s).into_iter().collect::<Vec<_>>(), "open segment");
        let mut batches = vec![0u32; segs.table.len()];
        for b in self.log.batches.values() {
            batches[b.seg as usize] += 1;
        }
        let mut readers = vec![0u32; segs.table.len()];
        for t in self.io.tokens.values() {
            match t {
                Token::Read(part) => readers[part.seg as usize] += 1,
                Token::Blocks(part) => readers[part.seg as usize] += 1,
                Token::RmwRead { seg, .. } | Token::GcRead { seg } | Token::ScanRead { seg } => {
                    readers[*seg as usize] += 1
                }
                Token::Batch(_) | Token::Sync { .. } | Token::CheckpointWrite => {}
            }
        }
        for (i, s) in segs.table.iter().enumerate() {
            assert_eq!(s.inflight_batches, batches[i], "segment {i}: batches in flight");
            assert_eq!(s.readers, readers[i], "segment {i}: reads in flight");
            if s.status == SegStatus::Free {
                assert_eq!(self.state.live[i], 0, "segment {i} is free yet holds live blocks");
            }
        }
    }

    /// Changes a segment's status, keeping the free count (consulted on every write) exact.
    pub(super) fn set_status(&mut self, seg: u32, status: SegStatus) {
        let st = &mut self.segments.table[seg as usize];
        if st.status == SegStatus::Free {
            self.segments.n_free -= 1;
        }
        if status == SegStatus::Free {
            self.segments.n_free += 1;
        }
        if st.status == SegStatus::PendingFree {
            self.segments.n_pending_free -= 1;
        }
        if status == SegStatus::PendingFree {
            self.segments.n_pending_free += 1;
        }
        st.status = status;
    }

    pub(super) fn seal_segment(&mut self, seg: u32) {
        let st = &self.segments.table[seg as usize];
        if st.status != SegStatus::Open {
            return;
        }
        if st.used_blocks == 0 {
            self.set_status(seg, SegStatus::Free);
            return;
        }
        self.set_status(seg, SegStatus::Sealed);
        self.check_segment_empty(seg);
    }

    pub(super) fn take_free_segment(&mut self) -> Option<u32> {
        // Lowest-numbered free segment: deterministic, and keeps a fresh store's writes near the
        // start of the device.
        let seg = self.segments.table.iter().position(|s| s.status == SegStatus::Free)? as u32;
        self.set_status(seg, SegStatus::Open);
        let st = &mut self.segments.table[seg as usize];
        st.seq = self.segments.next_seq;
        st.used_blocks = 0;
        st.min_data_lsn = 0;
        st.max_data_lsn = 0;
        st.max_lsn = 0;
        st.gc_skip = false;
        st.gc_leftover = false;
        st.trim_tags.clear();
        self.segments.next_seq += 1;
        Some(seg)
    }

    /// Whether a write of `n_blocks` data blocks may proceed without eating into the cleaner's
    /// reserve. Counts headers pessimistically.
    pub(super) fn space_for_user(&self, n_blocks: u64) -> bool {
        let seg_blocks = self.sb.segment_blocks as u64;
        let open_room = match (self.segments.open, &self.log.open) {
            (Some((_, next)), Some(b)) => {
                let used = b.start_block as u64
                    + b.with_seg_header as u64
                    + b.data.len() as u64
                    + header_blocks_for(b.entries.len(), b.data.len(), 0) as u64;
                seg_blocks.saturating_sub(used.max(next as u64))
            }
            (Some((_, next)), None) => seg_blocks - next as u64,
            _ => 0,
        };
        let free = self.free_segments() as u64;
        if n_blocks == 0 {
            // A trim only frees space. Its record (a header block or two) may use the cleaner's
            // reserve: otherwise a store filled to the brim with live data could never be emptied.
            return open_room >= 3 || free > 0;
        }
        let usable = free.saturating_sub(self.cfg.gc_reserve_segments as u64) * (seg_blocks - 1);
        let need = n_blocks + 8 + n_blocks / 32;
        open_room + usable >= need
    }

    /// Whether the segment holds trim entries that a replicated volume still needs for a resync
    /// (tag above the volume's trim floor): then it is neither cleaned nor reused.
    pub(super) fn pinned(&self, seg: u32) -> bool {
        self.segments.table[seg as usize].trim_tags.iter().any(|&(v, tag)| {
            if v == ANY_VOLUME {
                self.state.volumes.values().any(|vol| tag > vol.trim_floor)
            } else {
                self.state.volumes.get(&VolumeId(v)).is_some_and(|vol| tag > vol.trim_floor)
            }
        })
    }

    /// Moves an empty, settled segment towards reuse. Called whenever a segment loses a block, which
    /// also makes a cleaned segment with leftovers a candidate again.
    pub(super) fn check_segment_empty(&mut self, seg: u32) {
        self.segments.table[seg as usize].gc_leftover = false;
        let last = Lsn(self.log.next_lsn.0 - 1);
        let st = &self.segments.table[seg as usize];
        if matches!(st.status, SegStatus::Sealed)
            && st.inflight_batches == 0
            && self.state.live[seg as usize] == 0
            && !self.pinned(seg)
        {
            self.set_status(seg, SegStatus::PendingFree);
            self.segments.table[seg as usize].free_after_lsn = last;
        }
    }

    pub(super) fn release_reader(&mut self, seg: u32) {
        self.segments.table[seg as usize].readers -= 1;
        self.segments.free_scan_key = None;
    }

    /// Frees the pending segments whose conditions of reuse hold; asks for a checkpoint when only
    /// one stands between them and reuse while space is low.
    pub(super) fn step_free(&mut self) -> bool {
        if self.segments.n_pending_free == 0 {
            return false;
        }
        // The scan visits every segment; skip it while nothing it depends on has changed (a
        // segment waiting for a sync can stay pending for many requests).
        let key = (
            self.durability.durable_lsn,
            self.segments.reuse_below_seq,
            self.segments.n_pending_free,
            self.low_on_space(),
            matches!(self.ckpt.phase, CkptPhase::Idle),
        );
        if self.segments.free_scan_key == Some(key) {
            return false;
        }
        self.segments.free_scan_key = Some(key);
        let durable = self.durability.durable_lsn;
        let below = self.segments.reuse_below_seq;
        let mut blocked_on_ckpt = false;
        let mut progress = false;
        for i in 0..self.segments.table.len() {
            let s = &self.segments.table[i];
            if s.status != SegStatus::PendingFree {
                continue;
            }
            if s.free_after_lsn <= durable && s.readers == 0 {
                if s.seq < below {
                    self.set_status(i as u32, SegStatus::Free);
                    self.segments.table[i].used_blocks = 0;
                    progress = true;
                } else {
                    blocked_on_ckpt = true;
                }
            }
        }
        if blocked_on_ckpt && self.low_on_space() && matches!(self.ckpt.phase, CkptPhase::Idle) && !self.ckpt.wanted {
            self.ckpt.wanted = true;
            progress = true;
        }
        progress
    }

    pub(super) fn gc_low_segments(&self) -> usize {
        self.cfg.gc_reserve_segments as usize + 2 + self.sb.n_segments as usize / 64
    }

    pub(super) fn low_on_space(&self) -> bool {
        self.free_segments() < self.gc_low_segments() || matches!(self.intake.stall, Some(Stall::Space { .. }))
    }
}
