//! The checkpointer: a snapshot of the index, the volume table and the segment table, written to
//! the older of the two checkpoint slots, so that recovery replays only the log written since.
//!
//! Phases: `Idle` → `Draining` (the cleaner finishes its victim, batches in flight complete; no
//! new batch is sealed) → snapshot → `SyncBefore` (every record below the snapshot's `next_lsn`
//! durable) → `Writing` → `SyncAfter` (the checkpoint durable) → `Idle`.
//!
//! Owns the invariant that no checkpoint is taken while a batch is in flight or the cleaner holds
//! copies not yet applied, so a checkpoint equals the state after applying every record below its
//! `next_lsn`; and the reuse bound it hands to [`Segments`] once durable.

use super::*;

/// The checkpoint in progress and who waits for one.
pub(super) struct Checkpointer {
    pub(super) phase: CkptPhase,
    /// Sequence number of the last durable checkpoint.
    pub(super) seq: u64,
    /// The checkpoint recovery started from; the cleaner waits until a newer one is durable.
    pub(super) recovered_from_seq: u64,
    /// Log blocks written when the last snapshot was taken.
    pub(super) log_blocks_at: u64,
    /// Callers waiting for the next checkpoint to start.
    pub(super) waiters: Vec<Reply<()>>,
    /// Callers waiting for the checkpoint in progress.
    pub(super) in_progress_waiters: Vec<Reply<()>>,
    pub(super) wanted: bool,
    /// The sync after the checkpoint write, once issued.
    pub(super) sync_after_token: Option<u64>,
}

impl Checkpointer {
    pub(super) fn new(seq: u64) -> Checkpointer {
        Checkpointer {
            phase: CkptPhase::Idle,
            seq,
            recovered_from_seq: seq,
            log_blocks_at: 0,
            waiters: Vec::new(),
            in_progress_waiters: Vec::new(),
            // Recovery ends with a checkpoint, before anything else is written.
            wanted: true,
            sync_after_token: None,
        }
    }
}

impl CkptPhase {
    pub(super) fn name(&self) -> &'static str {
        match self {
            CkptPhase::Idle => "idle",
            CkptPhase::Draining => "draining",
            CkptPhase::SyncBefore { .. } => "sync-before",
            CkptPhase::Writing { .. } => "writing",
            CkptPhase::SyncAfter { .. } => "sync-after",
        }
    }
}

pub(super) enum CkptPhase {
    Idle,
    /// Wait for the cleaner to finish its victim, then for in-flight batches to drain.
    Draining,
    SyncBefore {
        through: Lsn,
        header: CheckpointHeader,
        buf: Option<AlignedBuf>,
    },
    Writing {
        header: CheckpointHeader,
    },
    SyncAfter {
        header: CheckpointHeader,
    },
}

impl Core {
    /// The checkpoint waits for the batches in flight to drain, and no new one starts.
    pub(super) fn draining_io(&self) -> bool {
        matches!(self.ckpt.phase, CkptPhase::Draining) && matches!(self.gc.phase, Gc::Idle | Gc::Reading)
    }

    /// Asks for a checkpoint once a checkpoint interval of log has been written, and moves the
    /// checkpoint through its phases.
    pub(super) fn step_checkpoint(&mut self) -> bool {
        let log_since = self.stats.log_blocks_written - self.ckpt.log_blocks_at;
        let interval_blocks = (self.cfg.checkpoint_interval_bytes / BB)
            .min(self.sb.n_segments as u64 * self.sb.segment_blocks as u64 / 4)
            .max(1);
        let mut progress = false;
        if log_since >= interval_blocks && !self.ckpt.wanted {
            self.ckpt.wanted = true;
            progress = true;
        }
        match &mut self.ckpt.phase {
            CkptPhase::Idle => {
                if self.ckpt.wanted {
                    self.ckpt.wanted = false;
                    self.ckpt.phase = CkptPhase::Draining;
                    self.ckpt.in_progress_waiters = std::mem::take(&mut self.ckpt.waiters);
                    return true;
                }
            }
            CkptPhase::Draining => {
                // A write held in a read-modify-write stall has not entered a batch: it does not
                // block the snapshot.
                if self.draining_io() && self.log.batches.is_empty() {
                    self.take_snapshot();
                    return true;
                }
            }
            CkptPhase::SyncBefore { through, header, buf } => {
                if self.durability.durable_lsn >= *through {
                    let header = *header;
                    let buf = buf.take().expect("checkpoint buffer");
                    let offset = self.sb.checkpoint_offsets[(header.seq % 2) as usize];
                    self.ckpt.phase = CkptPhase::Writing { header };
                    self.submit(Token::CheckpointWrite, IoKind::Write { offset, buf, durable: false });
                    return true;
                }
            }
            CkptPhase::Writing { .. } | CkptPhase::SyncAfter { .. } => {}
        }
        progress
    }

    /// The checkpoint's bytes are written; the sync after them makes it the one recovery uses.
    pub(super) fn checkpoint_written(&mut self, result: std::io::Result<()>) {
        if let Err(e) = result {
            self.poison(format!("checkpoint write failed: {e}"));
            self.fail_everything();
            return;
        }
        let CkptPhase::Writing { header } = &self.ckpt.phase else { unreachable!("checkpoint write completion") };
        self.ckpt.phase = CkptPhase::SyncAfter { header: *header };
        self.ckpt.sync_after_token = None;
    }

    /// Each phase has the I/O it waits for in flight, or the condition it waits for pending.
    pub(super) fn check_checkpointer(&self) {
        let writes = self.io.tokens.values().filter(|t| matches!(t, Token::CheckpointWrite)).count();
        assert_eq!(
            writes,
            matches!(self.ckpt.phase, CkptPhase::Writing { .. }) as usize,
            "checkpoint writes in flight"
        );
        if let Some(token) = self.ckpt.sync_after_token {
            assert!(matches!(self.ckpt.phase, CkptPhase::SyncAfter { .. }), "a sync for a checkpoint not written");
            assert!(
                matches!(self.io.tokens.get(&token), Some(Token::Sync { .. })),
                "the checkpoint's sync is not in flight"
            );
        }
        if let CkptPhase::SyncBefore { through, buf, .. } = &self.ckpt.phase {
            assert!(buf.is_some(), "checkpoint buffer");
            assert!(*through < self.log.next_lsn, "checkpoint beyond the log");
        }
    }

    /// Serializes the state into a checkpoint. Only called with no batch in flight and the cleaner
    /// holding no copies (see the module documentation).
    pub(super) fn take_snapshot(&mut self) {
        assert!(self.log.batches.is_empty() && self.draining_io(), "checkpoint with batches in flight");
        let mut data = CheckpointData {
            next_volume_id: self.state.next_volume_id,
            volumes: Vec::with_capacity(self.state.volumes.len()),
            segments: Vec::with_capacity(self.segments.table.len()),
            runs: Vec::new(),
            entries: Vec::new(),
        };
        for v in self.state.volumes.values() {
            data.volumes.push(VolumeRec {
                id: v.id.0,
                name: v.name.clone(),
                size_bytes: v.size_bytes,
                last_tag: v.last_tag,
                trim_floor: v.trim_floor,
                attr: v.attr.clone(),
                staged: v.staged.writes.iter().map(|(l, p)| (*l, *p)).collect(),
                staged_trims: v.staged.trims.clone(),
                resync_overflowed: v.staged.overflowed,
            });
            let mut run: Option<RunRec> = None;
            let runs = &mut data.runs;
            let entries = &mut data.entries;
            v.index.for_each_in(0, u64::MAX, |lba, e| {
                match &mut run {
                    Some(r) if r.lba + r.n_blocks as u64 == lba && r.n_blocks < u32::MAX => r.n_blocks += 1,
                    _ => {
                        if let Some(r) = run.take() {
                            runs.push(r);
                        }
                        run = Some(RunRec { volume: v.id.0, n_blocks: 1, lba });
                    }
                }
                entries.push(e);
            });
            if let Some(r) = run {
                data.runs.push(r);
            }
        }
        for s in &self.segments.table {
            // Segments on their way to reuse are recorded as empty.
            let used = match s.status {
                SegStatus::Free => 0,
                _ => s.used_blocks,
            };
            data.segments.push(SegmentRec {
                seq: s.seq,
                used_blocks: used,
                min_data_lsn: s.min_data_lsn,
                max_data_lsn: s.max_data_lsn,
                max_lsn: s.max_lsn,
                trim_tags: s.trim_tags.clone(),
            });
        }
        let payload = data.to_bytes();
        let (tail_segment, tail_block, tail_seq) = match self.segments.open {
            Some((seg, next)) => (seg, next, self.segments.table[seg as usize].seq),
            None => (u32::MAX, 0, 0),
        };
        let header = CheckpointHeader {
            store_id: self.sb.store_id,
            seq: self.ckpt.seq + 1,
            next_lsn: self.log.next_lsn,
            next_segment_seq: self.segments.next_seq,
            tail_segment,
            tail_block,
            tail_seq,
            payload_bytes: payload.len() as u64,
            payload_crc: crc32fast::hash(&payload),
        };
        let n_blocks = 1 + payload.len().div_ceil(BLOCK_BYTES);
        if n_blocks as u64 > self.sb.checkpoint_slot_blocks {
            self.poison(format!(
                "checkpoint of {} bytes does not fit its slot of {} blocks (internal sizing error)",
                payload.len(),
                self.sb.checkpoint_slot_blocks
            ));
            self.fail_everything();
            return;
        }
        let mut buf = AlignedBuf::zeroed(n_blocks);
        buf.block_mut(0).copy_from_slice(&header.encode());
        buf[BLOCK_BYTES..BLOCK_BYTES + payload.len()].copy_from_slice(&payload);
        self.stats.checkpoint_bytes_last = (n_blocks * BLOCK_BYTES) as u64;
        self.ckpt.log_blocks_at = self.stats.log_blocks_written;
        let through = Lsn(self.log.next_lsn.0 - 1);
        self.ckpt.phase = CkptPhase::SyncBefore { through, header, buf: Some(buf) };
        tracing::debug!("checkpoint {} snapshot at LSN {}", header.seq, through);
    }

    pub(super) fn checkpoint_done(&mut self, header: CheckpointHeader) {
        self.ckpt.seq = header.seq;
        // The tail segment still receives records replayed from this checkpoint: it must not be
        // reused before the next one.
        self.segments.reuse_below_seq =
            if header.tail_segment == u32::MAX { header.next_segment_seq } else { header.tail_seq };
        self.stats.checkpoints += 1;
        self.ckpt.phase = CkptPhase::Idle;
        self.ckpt.sync_after_token = None;
        for r in self.ckpt.in_progress_waiters.drain(..) {
            let _ = r.send(Ok(()));
        }
        tracing::debug!("checkpoint {} durable", header.seq);
    }
}
