//! The cleaner: when free segments run low, it picks a victim by cost-benefit (Rosenblum and
//! Ousterhout: mostly dead and old), reads it whole, and copies its live blocks forward into the
//! log head, at most half of each batch so that foreground writes keep going. A copy names the
//! block's old place; applying it is a no-op if the block was overwritten meanwhile.
//!
//! A victim's segment is reused only through [`Segments`]' conditions of reuse, like any other.

use super::*;

/// The cleaner's state.
#[derive(Default)]
pub(super) struct Cleaner {
    pub(super) phase: Gc,
}

/// Most blocks the cleaner adds to one batch, so that foreground writes always get at least half of
/// every batch while the cleaner runs.
pub(super) const GC_BLOCKS_PER_BATCH_MAX: usize = BATCH_BLOCKS_MAX as usize / 2;

#[derive(Default)]
pub(super) enum Gc {
    #[default]
    Idle,
    Reading,
    /// Copies of `seg` queued or in flight.
    Copying {
        seg: u32,
        queued: VecDeque<GcCopy>,
        in_flight: usize,
    },
}

pub(super) struct GcCopy {
    pub(super) volume: VolumeId,
    pub(super) tag: Tag,
    pub(super) lba: u64,
    pub(super) old_phys: u32,
    pub(super) data_lsn: Lsn,
    pub(super) data: Bytes,
}

impl Core {
    /// Whether waiting for the cleaner can produce free space.
    pub(super) fn gc_can_help(&self) -> bool {
        if !matches!(self.gc.phase, Gc::Idle) || !matches!(self.ckpt.phase, CkptPhase::Idle) {
            return true;
        }
        self.segments.table.iter().enumerate().any(|(i, s)| match s.status {
            SegStatus::PendingFree => true,
            SegStatus::Sealed => !s.gc_skip && !s.gc_leftover && self.victim_gain(i) > 0 && !self.pinned(i as u32),
            _ => false,
        })
    }

    /// Net blocks gained by cleaning segment `i`, or <= 0 if it is not worth cleaning. Copying
    /// costs the live blocks plus record headers, so a victim must be at least 1/8 dead (plus two
    /// blocks of slack for headers): otherwise the cleaner could spin, copying as much as it frees.
    pub(super) fn victim_gain(&self, i: usize) -> i64 {
        let seg_blocks = self.sb.segment_blocks as i64;
        let live = self.state.live[i] as i64;
        let dead = seg_blocks - live;
        if dead < seg_blocks / 8 + 2 {
            return 0;
        }
        dead - (live / 128 + 2)
    }

    /// Finishes a victim whose copies are all applied; picks a new victim when space is low.
    pub(super) fn step_cleaner(&mut self) -> bool {
        // Until the checkpoint that ends recovery is durable, the segments of the old checkpoint's
        // log (some of them now empty) are still what a crash would replay: nothing may be copied
        // into them.
        if self.ckpt.seq == self.ckpt.recovered_from_seq {
            return false;
        }
        let mut progress = false;
        if let Gc::Copying { seg, queued, in_flight } = &self.gc.phase {
            if queued.is_empty() && *in_flight == 0 {
                let seg = *seg;
                self.set_status(seg, SegStatus::Sealed);
                if self.state.live[seg as usize] == 0 {
                    self.stats.segments_cleaned += 1;
                    self.check_segment_empty(seg);
                } else {
                    tracing::debug!(
                        "segment {seg} still has {} live blocks after cleaning; retried once one of them dies",
                        self.state.live[seg as usize]
                    );
                    self.segments.table[seg as usize].gc_leftover = true;
                }
                self.gc.phase = Gc::Idle;
                progress = true;
            }
        }
        if !matches!(self.gc.phase, Gc::Idle) || !matches!(self.ckpt.phase, CkptPhase::Idle) || !self.low_on_space() {
            return progress;
        }
        // Cost-benefit (Rosenblum & Ousterhout): prefer segments that are empty and old.
        let now = self.log.next_lsn.0;
        let mut best: Option<(f64, u32)> = None;
        let mut blocked_by_seq = false;
        let room = self.free_segments() as i64 * (self.sb.segment_blocks as i64 - 1);
        for (i, s) in self.segments.table.iter().enumerate() {
            if s.status != SegStatus::Sealed
                || s.gc_skip
                || s.gc_leftover
                || s.inflight_batches > 0
                || self.victim_gain(i) <= 0
                || self.pinned(i as u32)
            {
                continue;
            }
            let live = self.state.live[i] as i64;
            if live + live / 200 + 8 > room {
                continue;
            }
            if s.seq >= self.segments.reuse_below_seq {
                blocked_by_seq = true;
                continue;
            }
            let u = live as f64 / self.sb.segment_blocks as f64;
            let age = (now.saturating_sub(s.max_lsn) + 1) as f64;
            let score = (1.0 - u) * age / (1.0 + u);
            if best.is_none_or(|(b, _)| score > b) {
                best = Some((score, i as u32));
            }
        }
        let Some((_, seg)) = best else {
            if blocked_by_seq && !self.ckpt.wanted {
                self.ckpt.wanted = true;
                return true;
            }
            return progress;
        };
        self.set_status(seg, SegStatus::Victim);
        let st = &mut self.segments.table[seg as usize];
        st.readers += 1;
        let n = st.used_blocks as usize;
        let offset = self.seg_offset_bytes(seg, 0);
        self.gc.phase = Gc::Reading;
        self.submit(Token::GcRead { seg }, IoKind::Read { offset, buf: AlignedBuf::zeroed(n) });
        true
    }

    pub(super) fn gc_parse_victim(&mut self, seg: u32, buf: AlignedBuf) {
        let mut copies = VecDeque::new();
        let mut corrupt = None;
        let owner = Bytes::from_owner(buf);
        let parse = walk_data_blocks(&self.sb, seg, &owner, |e, lba, phys, block_idx, crc| {
            let Some(vol) = self.state.volumes.get(&e.volume) else { return true };
            // Live in the index, or staged by an uncommitted resync (then its copy stays staged).
            let staged = vol.staged.writes.get(&lba).copied().filter(|p| phys_of(*p) == Some(phys));
            let entry = staged.unwrap_or_else(|| vol.index.get(lba));
            if phys_of(entry) != Some(phys) {
                return true;
            }
            let data = owner.slice(block_idx * BLOCK_BYTES..(block_idx + 1) * BLOCK_BYTES);
            let got = block_crc(&data);
            if got != crc_of(entry) || got != crc {
                let what = format!("live block checksum {got:#010x}, expected {:#010x}", crc_of(entry));
                corrupt = Some(self.corrupt_error(seg, phys, what));
                return false;
            }
            copies.push_back(GcCopy {
                volume: e.volume,
                tag: Tag { seq: e.tag, resync: staged.is_some() },
                lba,
                old_phys: phys,
                data_lsn: e.data_lsn,
                data,
            });
            true
        });
        if let Some(e) = corrupt {
            tracing::error!("cleaner skips segment {seg}: {e}");
            self.set_status(seg, SegStatus::Sealed);
            self.segments.table[seg as usize].gc_skip = true;
            self.gc.phase = Gc::Idle;
            return;
        }
        if let Err(why) = parse {
            if copies.len() as u32 != self.state.live[seg as usize] {
                tracing::error!("cleaner cannot parse segment {seg}: {why}");
                self.set_status(seg, SegStatus::Sealed);
                self.segments.table[seg as usize].gc_skip = true;
                self.gc.phase = Gc::Idle;
                return;
            }
        }
        self.gc.phase = Gc::Copying { seg, queued: copies, in_flight: 0 };
    }

    /// Moves queued cleaner copies into the open batch, bounded per batch.
    pub(super) fn feed_gc_copies(&mut self) -> bool {
        let Gc::Copying { queued, .. } = &mut self.gc.phase else { return false };
        if queued.is_empty() {
            return false;
        }
        let mut queued = std::mem::take(queued);
        let mut added = 0usize;
        let mut dropped = 0usize;
        while let Some(c) = queued.front() {
            let still_live = self.state.volumes.get(&c.volume).is_some_and(|v| {
                let at =
                    if c.tag.resync { v.staged.writes.get(&c.lba).copied().unwrap_or(0) } else { v.index.get(c.lba) };
                phys_of(at) == Some(c.old_phys)
            }) && !self.log.pending.contains_key(&(c.volume, c.lba));
            if !still_live {
                queued.pop_front();
                dropped += 1;
                continue;
            }
            let gc_in_batch = self.log.open.as_ref().map_or(0, |b| b.gc_blocks);
            if gc_in_batch >= GC_BLOCKS_PER_BATCH_MAX {
                break;
            }
            if !self.ensure_open_batch() {
                break;
            }
            let c = queued.pop_front().expect("front");
            self.add_block(c.volume, c.lba, c.data, 0, Some((c.old_phys, c.data_lsn)), c.tag);
            added += 1;
        }
        if let Gc::Copying { queued: q, in_flight, .. } = &mut self.gc.phase {
            *q = queued;
            *in_flight += added;
        }
        added > 0 || dropped > 0
    }

    /// The victim's blocks were read: its live blocks are queued to be copied forward.
    pub(super) fn victim_read(&mut self, seg: u32, c: Completion) {
        self.release_reader(seg);
        match (c.result, c.buf) {
            (Ok(()), Some(buf)) => self.gc_parse_victim(seg, buf),
            (r, _) => {
                tracing::error!("cleaner could not read segment {seg}: {:?}", r.err());
                self.set_status(seg, SegStatus::Sealed);
                self.segments.table[seg as usize].gc_skip = true;
                self.gc.phase = Gc::Idle;
            }
        }
    }

    /// Exactly the victim is in `Victim`, and while its segment is read, that read is in flight.
    pub(super) fn check_cleaner(&self) {
        let victims: Vec<u32> = (0..self.segments.table.len() as u32)
            .filter(|&s| self.segments.table[s as usize].status == SegStatus::Victim)
            .collect();
        match &self.gc.phase {
            Gc::Idle => assert!(victims.is_empty(), "victims {victims:?} with the cleaner idle"),
            Gc::Reading => {
                assert_eq!(victims.len(), 1, "one victim while reading");
                let reading = self.io.tokens.values().any(|t| matches!(t, Token::GcRead { seg } if *seg == victims[0]));
                assert!(reading, "the victim's read is in flight");
            }
            Gc::Copying { seg, .. } => assert_eq!(victims, [*seg], "the victim being copied"),
        }
    }
}
