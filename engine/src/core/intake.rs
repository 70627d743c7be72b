//! Intake: requests in arrival order, validated and turned into log work. Writes are split into
//! blocks; a partial block is merged with its current content, read from the device if need be
//! (intake pauses meanwhile, so requests stay in order); a write that does not fit waits for the
//! cleaner. Volume-table changes are applied here and logged as records of their own.
//!
//! Owns the refusal of changes after a failed write or sync ([`Core::admit`]).

use super::*;

/// The request queue and the write that holds it up.
#[derive(Default)]
pub(super) struct Intake {
    pub(super) queue: VecDeque<Request>,
    /// A write at the head of intake that cannot go on yet; nothing behind it is taken.
    pub(super) stall: Option<Stall>,
}

/// Sealed batches allowed to wait behind the in-flight limit before intake pauses. One maximal
/// write (32 MiB) seals up to 32 batches at once; beyond that, queueing more only adds latency.
pub(super) const SEALED_QUEUE_MAX: usize = 40;

/// A block source in a write operation after intake.
pub(super) enum Piece {
    /// Whole blocks of data (`data.len()` is a multiple of the block size).
    Data {
        lba: u64,
        data: Bytes,
    },
    /// Part of one block: `data` goes at byte `at` of block `lba`.
    Partial {
        lba: u64,
        at: usize,
        data: Bytes,
    },
    Unmap {
        lba: u64,
        n_blocks: u64,
    },
    /// Whole blocks of written zeros.
    Zero {
        lba: u64,
        n_blocks: u64,
    },
}

/// A write, trim or zeroing on its way through intake.
pub(super) struct WriteOp {
    pub(super) volume: VolumeId,
    pub(super) tag: Tag,
    pub(super) pieces: Vec<Piece>,
    pub(super) durable: bool,
    /// Answer once queued in the log if the write-back budget allows (see [`WRITE_BACK_BLOCKS_MAX`]).
    pub(super) write_back: bool,
    pub(super) done: Done,
}

impl WriteOp {
    /// An op with no pieces yet, answered on `reply`.
    fn new(volume: VolumeId, tag: Tag, durable: bool, write_back: bool, reply: Reply<Written>) -> WriteOp {
        WriteOp { volume, tag, pieces: Vec::new(), durable, write_back, done: Done::Write(reply) }
    }
}

pub(super) enum Stall {
    /// Read-modify-write reads outstanding for the op at the head of intake.
    Rmw { op: WriteOp, bases: HashMap<u64, Bytes>, outstanding: usize, error: Option<Error> },
    /// A write waits for the cleaner to free space.
    Space { op: WriteOp, n_blocks: u64 },
}

pub(super) enum CurrentBlock {
    Known(Bytes),
    OnDisk { phys: u32, crc: u32 },
}

pub(super) fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= NAME_BYTES_MAX
        && name.bytes().all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c));
    if ok {
        Ok(())
    } else {
        Err(Error::BadVolumeName(name.to_string()))
    }
}

pub(super) fn check_size(size_bytes: u64) -> Result<()> {
    if size_bytes == 0 || size_bytes % BB != 0 {
        return Err(Error::InvalidArgument(format!("volume size {size_bytes} must be a non-zero multiple of 4096")));
    }
    // LBAs are u64 but the trim entry arithmetic and index root vector want sane sizes: 1 PiB.
    if size_bytes > 1 << 50 {
        return Err(Error::InvalidArgument(format!("volume size {size_bytes} exceeds the 1 PiB limit")));
    }
    Ok(())
}

/// Splits a byte-granular write into whole-block data and partial-block pieces.
/// A read or write of scattered blocks names at most `SCATTERED_BLOCKS_MAX`.
pub(super) fn check_scattered(n_blocks: usize) -> Result<()> {
    if n_blocks > SCATTERED_BLOCKS_MAX {
        let len = n_blocks as u64 * BB;
        return Err(Error::TooLarge { len, limit: SCATTERED_BLOCKS_MAX as u64 * BB });
    }
    Ok(())
}

pub(super) fn split_write(offset: u64, data: Bytes) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut off = offset;
    let mut rest = data;
    while !rest.is_empty() {
        let lba = off / BB;
        let at = (off % BB) as usize;
        if at != 0 || rest.len() < BLOCK_BYTES {
            let n = (BLOCK_BYTES - at).min(rest.len());
            pieces.push(Piece::Partial { lba, at, data: rest.split_to(n) });
            off += n as u64;
        } else {
            let n = rest.len() / BLOCK_BYTES * BLOCK_BYTES;
            pieces.push(Piece::Data { lba, data: rest.split_to(n) });
            off += n as u64;
        }
    }
    pieces
}

pub(super) fn split_zeroes(offset: u64, len: u64, may_trim: bool) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let end = offset + len;
    let first_whole = offset.div_ceil(BB);
    let end_whole = end / BB;
    if first_whole > end_whole {
        // Inside one block.
        pieces.push(Piece::Partial { lba: offset / BB, at: (offset % BB) as usize, data: zeros(len as usize) });
        return pieces;
    }
    if offset % BB != 0 {
        let n = (first_whole * BB - offset) as usize;
        pieces.push(Piece::Partial { lba: offset / BB, at: (offset % BB) as usize, data: zeros(n) });
    }
    if end_whole > first_whole {
        let n_blocks = end_whole - first_whole;
        pieces.push(if may_trim {
            Piece::Unmap { lba: first_whole, n_blocks }
        } else {
            Piece::Zero { lba: first_whole, n_blocks }
        });
    }
    if end % BB != 0 {
        pieces.push(Piece::Partial { lba: end_whole, at: 0, data: zeros((end % BB) as usize) });
    }
    pieces
}

pub(super) fn zeros(n: usize) -> Bytes {
    Bytes::from_static(&ZERO_BLOCK[..n])
}

impl Core {
    /// Takes queued requests in arrival order until one must wait (a read-modify-write, space from
    /// the cleaner, a volume change behind unapplied writes) or the log is backed up.
    pub(super) fn step_intake(&mut self) -> bool {
        // Backpressure: stop taking requests while sealed batches queue up behind the in-flight
        // limit, and while a checkpoint waits for in-flight batches to drain.
        if self.log.unsubmitted.len() >= SEALED_QUEUE_MAX || self.draining_io() {
            return false;
        }
        let mut progress = false;
        if let Some(Stall::Space { .. }) = &self.intake.stall {
            let Some(Stall::Space { op, n_blocks }) = self.intake.stall.take() else { unreachable!() };
            if self.space_for_user(n_blocks) {
                self.add_write(op);
            } else if self.gc_can_help() {
                self.intake.stall = Some(Stall::Space { op, n_blocks });
                return false;
            } else {
                tracing::warn!(
                    "write refused: store full ({} free segments, nothing left to clean)",
                    self.free_segments()
                );
                op.done.send(Err(Error::NoSpace));
            }
            progress = true;
        }
        while self.intake.stall.is_none() && self.log.unsubmitted.len() < SEALED_QUEUE_MAX {
            let is_meta = matches!(
                self.intake.queue.front(),
                Some(
                    Request::CreateVolume { .. }
                        | Request::ResizeVolume { .. }
                        | Request::DeleteVolume { .. }
                        | Request::SetRepl { .. }
                )
            );
            if is_meta
                && (!self.log.batches.is_empty() || self.log.open.as_ref().is_some_and(|b| !b.entries.is_empty()))
            {
                // Volume-table changes take effect in memory at once, so every earlier write must
                // be applied first, or the live engine and replay would disagree on the order.
                progress |= self.seal_open_batch();
                break;
            }
            let Some(req) = self.intake.queue.pop_front() else { break };
            self.admit(req);
            progress = true;
        }
        progress
    }

    /// The one place where a poisoned engine refuses changes: after a failed write or sync, every
    /// write, trim, zeroing, flush, checkpoint and volume change fails here with the cause. Reads
    /// and queries go on (they see only what was applied). Writes already admitted are failed by
    /// [`Core::fail_everything`].
    fn admit(&mut self, req: Request) {
        if req.refused_when_poisoned() {
            if let Some(e) = self.poisoned_error() {
                req.refuse(e);
                return;
            }
        }
        self.handle(req);
    }

    /// Validates an admitted request and starts it; a refusal is answered at once.
    pub(super) fn handle(&mut self, req: Request) {
        match req {
            Request::Read { volume, offset, len, reply } => self.handle_read(volume, offset, len, reply),
            Request::Write { volume, offset, data, fua, tag, write_back, reply } => {
                let len = data.len() as u64;
                match self.check_write(volume, offset, len) {
                    Ok(()) if len == 0 => drop(reply.send(Ok(Written { durable: false }))),
                    r => {
                        let op = WriteOp::new(volume, tag, fua, write_back && !fua, reply);
                        self.start_or_refuse(r.map(|()| split_write(offset, data)), op);
                    }
                }
            }
            Request::Trim { volume, offset, len, tag, reply } => {
                // Trim is advisory: the whole blocks inside the range go, partial ones stay. (The
                // range is checked before its end is computed: it could overflow.)
                let pieces = self.check_range(volume, offset, len).map(|()| {
                    let (first, end) = (offset.div_ceil(BB), (offset + len) / BB);
                    match end > first {
                        true => vec![Piece::Unmap { lba: first, n_blocks: end - first }],
                        false => vec![],
                    }
                });
                self.start_or_refuse(pieces, WriteOp::new(volume, tag, false, false, reply));
            }
            Request::WriteZeroes { volume, offset, len, may_trim, fua, tag, reply } => {
                let pieces = self.check_range(volume, offset, len).map(|()| split_zeroes(offset, len, may_trim));
                self.start_or_refuse(pieces, WriteOp::new(volume, tag, fua, false, reply));
            }
            Request::Flush { reply } => {
                // Everything submitted before the flush, not just what was acknowledged: simpler to
                // reason about and costs nothing extra, as the open batch is sealed anyway.
                let id = self.add_waiter(0, true, Done::Unit(reply));
                self.close_open_batch_for_flush(id);
            }
            Request::BlockStatus { volume, offset, len, reply } => {
                drop(reply.send(self.block_status(volume, offset, len)))
            }
            Request::BlockCrcs { volume, offset, len, reply } => drop(reply.send(self.block_crcs(volume, offset, len))),
            Request::BlockPlaces { volume, runs, reply } => drop(reply.send(self.block_places(volume, &runs))),
            Request::ReadBlocks { volume, lbas, reply } => self.handle_read_blocks(volume, lbas, reply),
            Request::WriteBlocks { volume, blocks, tag, reply } => {
                let pieces = self
                    .check_blocks(volume, &blocks)
                    .map(|()| blocks.into_iter().map(|(lba, data)| Piece::Data { lba, data }).collect::<Vec<_>>());
                self.start_or_refuse(pieces, WriteOp::new(volume, tag, false, false, reply));
            }
            Request::CreateVolume { name, size_bytes, reply } => self.create_volume(name, size_bytes, reply),
            Request::ResizeVolume { volume, size_bytes, reply } => {
                let r = self.volume_exists(volume).and_then(|()| check_size(size_bytes));
                self.meta_or_refuse(r, MetaOp::Resize { volume, size_bytes }, reply);
            }
            Request::DeleteVolume { volume, reply } => {
                let r = self.volume_exists(volume);
                self.meta_or_refuse(r, MetaOp::Delete { volume }, reply);
            }
            Request::ListVolumes { reply } => {
                let list = self.state.volumes.values().map(|v| self.state.volume_info(v)).collect();
                let _ = reply.send(Ok(list));
            }
            Request::ChangedSince { volume, since, reply } => match self.volume_exists(volume) {
                Ok(()) => self.start_scan(volume, since, reply),
                Err(e) => drop(reply.send(Err(e))),
            },
            Request::SetRepl { volume, last_tag, trim_floor, attr, staged, reply } => {
                let r = self.check_set_repl(volume, &attr);
                let ok = r.is_ok();
                self.meta_or_refuse(r, MetaOp::SetRepl { volume, last_tag, trim_floor, attr, staged }, reply);
                if ok {
                    // A raised floor may unpin segments that are already empty.
                    for seg in 0..self.sb.n_segments {
                        self.check_segment_empty(seg);
                    }
                }
            }
            Request::Checkpoint { reply } => {
                self.ckpt.waiters.push(reply);
                self.ckpt.wanted = true;
            }
            Request::Stats { reply } => drop(reply.send(Ok(self.stats()))),
            Request::Shutdown { reply } => {
                self.shutdown = Some(reply);
                // A clean stop checkpoints, so that the next start replays nothing.
                if self.poisoned.is_none() {
                    self.ckpt.wanted = true;
                }
            }
        }
    }

    fn start_or_refuse(&mut self, pieces: Result<Vec<Piece>>, mut op: WriteOp) {
        match pieces {
            Ok(pieces) => {
                op.pieces = pieces;
                self.start_write(op);
            }
            Err(e) => op.done.send(Err(e)),
        }
    }

    fn meta_or_refuse(&mut self, check: Result<()>, op: MetaOp, reply: Reply<()>) {
        match check {
            Ok(()) => self.meta_op(op, Done::Unit(reply)),
            Err(e) => drop(reply.send(Err(e))),
        }
    }

    pub(super) fn volume_exists(&self, volume: VolumeId) -> Result<()> {
        self.state.volumes.get(&volume).map(|_| ()).ok_or(Error::NoSuchVolume(volume))
    }

    /// A replication attribute fits its bound, and the store's bound on replicated volumes.
    fn check_set_repl(&self, volume: VolumeId, attr: &[u8]) -> Result<()> {
        self.volume_exists(volume)?;
        if attr.len() > ATTR_BYTES_MAX {
            return Err(Error::InvalidArgument(format!(
                "replication attribute of {} bytes exceeds {ATTR_BYTES_MAX}",
                attr.len()
            )));
        }
        let others = self.state.volumes.values().filter(|v| v.id != volume && !v.attr.is_empty()).count();
        let max = crate::checkpoint::attr_volumes_fitting(&self.sb);
        if !attr.is_empty() && others >= max {
            return Err(Error::InvalidArgument(format!(
                "{max} volumes of this store are already replicated, all its checkpoints budget for; use another \
                 store, or a larger one (a store budgets one per 16 MiB of its size)"
            )));
        }
        Ok(())
    }

    pub(super) fn check_range(&self, volume: VolumeId, offset: u64, len: u64) -> Result<()> {
        let vol = self.state.volumes.get(&volume).ok_or(Error::NoSuchVolume(volume))?;
        match offset.checked_add(len) {
            Some(end) if end <= vol.size_bytes => Ok(()),
            _ => Err(Error::OutOfRange { volume, offset, len, size: vol.size_bytes }),
        }
    }

    /// A write of scattered blocks: at most `SCATTERED_BLOCKS_MAX`, each one whole block inside
    /// the volume.
    fn check_blocks(&self, volume: VolumeId, blocks: &[(u64, Bytes)]) -> Result<()> {
        check_scattered(blocks.len())?;
        self.volume_exists(volume)?;
        for (lba, data) in blocks {
            if data.len() != BLOCK_BYTES {
                return Err(Error::InvalidArgument(format!(
                    "a write of scattered blocks takes whole blocks, got {} bytes for block {lba}",
                    data.len()
                )));
            }
            self.check_block(volume, *lba)?;
        }
        Ok(())
    }

    /// Block `lba` lies inside the volume (an LBA whose byte offset overflows does not).
    pub(super) fn check_block(&self, volume: VolumeId, lba: u64) -> Result<()> {
        self.check_range(volume, lba.saturating_mul(BB), BB)
    }

    pub(super) fn check_write(&self, volume: VolumeId, offset: u64, len: u64) -> Result<()> {
        if len > IO_BYTES_MAX {
            return Err(Error::TooLarge { len, limit: IO_BYTES_MAX });
        }
        self.check_range(volume, offset, len)
    }

    pub(super) fn start_write(&mut self, op: WriteOp) {
        let mut bases = HashMap::new();
        let mut outstanding = 0;
        let volume = op.volume;
        for piece in &op.pieces {
            let Piece::Partial { lba, .. } = piece else { continue };
            if bases.contains_key(lba) {
                continue;
            }
            match self.current_block(volume, *lba) {
                CurrentBlock::Known(b) => {
                    bases.insert(*lba, b);
                }
                CurrentBlock::OnDisk { phys, crc } => {
                    let seg = phys / self.sb.segment_blocks;
                    self.segments.table[seg as usize].readers += 1;
                    let offset = self.phys_offset_bytes(phys);
                    self.submit(
                        Token::RmwRead { lba: *lba, seg, crc, phys },
                        IoKind::Read { offset, buf: AlignedBuf::zeroed(1) },
                    );
                    outstanding += 1;
                }
            }
        }
        if outstanding > 0 {
            self.intake.stall = Some(Stall::Rmw { op, bases, outstanding, error: None });
            return;
        }
        self.finish_intake(op, bases);
    }

    pub(super) fn finish_intake(&mut self, mut op: WriteOp, bases: HashMap<u64, Bytes>) {
        // Merge partial pieces into whole blocks, in order (two partials may hit one block).
        let mut merged: HashMap<u64, BytesMut> = HashMap::new();
        let mut pieces = Vec::with_capacity(op.pieces.len());
        for piece in op.pieces.drain(..) {
            match piece {
                Piece::Partial { lba, at, data } => {
                    let block = merged.entry(lba).or_insert_with(|| BytesMut::from(&bases[&lba][..]));
                    block[at..at + data.len()].copy_from_slice(&data);
                    if !pieces.iter().any(|p| matches!(p, Piece::Partial { lba: l, .. } if *l == lba)) {
                        pieces.push(Piece::Partial { lba, at: 0, data: Bytes::new() });
                    }
                }
                other => pieces.push(other),
            }
        }
        let pieces = pieces
            .into_iter()
            .map(|p| match p {
                Piece::Partial { lba, .. } => Piece::Data { lba, data: merged.remove(&lba).expect("merged").freeze() },
                other => other,
            })
            .collect();
        op.pieces = pieces;
        let n_blocks: u64 = op
            .pieces
            .iter()
            .map(|p| match p {
                Piece::Data { data, .. } => data.len() as u64 / BB,
                Piece::Zero { n_blocks, .. } => *n_blocks,
                _ => 0,
            })
            .sum();
        if self.space_for_user(n_blocks) {
            self.add_write(op);
        } else if self.gc_can_help() {
            tracing::debug!("write of {n_blocks} blocks waits for the cleaner");
            self.intake.stall = Some(Stall::Space { op, n_blocks });
        } else {
            tracing::warn!("write refused: store full ({} free segments, nothing left to clean)", self.free_segments());
            op.done.send(Err(Error::NoSpace));
        }
    }

    pub(super) fn create_volume(&mut self, name: String, size_bytes: u64, reply: Reply<VolumeInfo>) {
        let r = check_name(&name).and_then(|()| {
            check_size(size_bytes)?;
            if self.state.volumes.values().any(|v| v.name == name) {
                return Err(Error::VolumeExists(name.clone()));
            }
            if self.state.volumes.len() >= VOLUMES_MAX {
                return Err(Error::TooManyVolumes { limit: VOLUMES_MAX });
            }
            Ok(())
        });
        if let Err(e) = r {
            let _ = reply.send(Err(e));
            return;
        }
        let volume = VolumeId(self.state.next_volume_id);
        let info = VolumeInfo {
            id: volume,
            name: name.clone(),
            size_bytes,
            mapped_bytes: 0,
            last_tag: 0,
            trim_floor: u64::MAX,
            attr: Vec::new(),
            staged_blocks: 0,
            resync_overflowed: false,
        };
        self.meta_op(MetaOp::Create { volume, size_bytes, name }, Done::Volume(reply, info));
    }

    /// Applies a volume-table change in memory now and logs it as a record of its own, sealed at
    /// once so that it takes its place in LSN order; the reply waits until the record is durable.
    pub(super) fn meta_op(&mut self, op: MetaOp, done: Done) {
        // A meta record needs a block or two; refuse cleanly rather than run out mid-way.
        let open_room = self.segments.open.map_or(0, |(_, next)| self.sb.segment_blocks - next);
        if self.segments.n_free == 0 && open_room < 3 + self.log.open.as_ref().map_or(0, |b| b.data.len() as u32 + 3) {
            done.send(Err(Error::NoSpace));
            return;
        }
        let mut dead = Vec::new();
        self.state.apply_meta(&op, |s| dead.push(s));
        if let MetaOp::Delete { volume } | MetaOp::Resize { volume, .. } = &op {
            let limit = match &op {
                MetaOp::Resize { size_bytes, .. } => size_bytes / BB,
                _ => 0,
            };
            let volume = *volume;
            self.log.pending.retain(|(v, l), _| !(*v == volume && *l >= limit));
        }
        let waiter = self.add_waiter(1, true, done);
        self.seal_open_batch();
        if !self.ensure_open_batch() {
            return;
        }
        let b = self.log.open.as_mut().expect("open batch");
        b.meta = Some(op);
        b.waiters.push(waiter);
        // Segments emptied by this change may be reused only once its record is durable, so they
        // are examined after it has its LSN.
        self.seal_open_batch();
        dead.sort_unstable();
        dead.dedup();
        for s in dead {
            self.check_segment_empty(s as u32);
        }
    }

    pub(super) fn current_block(&self, volume: VolumeId, lba: u64) -> CurrentBlock {
        if let Some(p) = self.log.pending.get(&(volume, lba)) {
            return CurrentBlock::Known(p.data.clone().unwrap_or_else(|| Bytes::from_static(&ZERO_BLOCK)));
        }
        if self.log.pending_unmaps.iter().any(|u| u.covers(volume, lba)) {
            return CurrentBlock::Known(Bytes::from_static(&ZERO_BLOCK));
        }
        let entry = self.state.volumes.get(&volume).map(|v| v.effective(lba)).unwrap_or(0);
        match phys_of(entry) {
            Some(phys) => CurrentBlock::OnDisk { phys, crc: crc_of(entry) },
            None => CurrentBlock::Known(Bytes::from_static(&ZERO_BLOCK)),
        }
    }

    /// A read for a read-modify-write returned; when the last one has, the stalled write goes on.
    pub(super) fn rmw_read_done(&mut self, lba: u64, seg: u32, crc: u32, phys: u32, c: Completion) {
        self.release_reader(seg);
        let block = match (c.result, c.buf) {
            (Ok(()), Some(buf)) if block_crc(&buf) == crc => Ok(Bytes::copy_from_slice(&buf)),
            (Ok(()), Some(buf)) => Err(self.corrupt_error(
                seg,
                phys,
                format!("block checksum {:#010x}, expected {crc:#010x}", block_crc(&buf)),
            )),
            (Err(e), _) => Err(Error::io(format!("read at device offset {}", self.phys_offset_bytes(phys)), e)),
            (Ok(()), None) => Err(Error::InvalidArgument("read returned no buffer".into())),
        };
        let Some(Stall::Rmw { bases, outstanding, error, .. }) = &mut self.intake.stall else {
            unreachable!("RMW read without a stalled write")
        };
        match block {
            Ok(b) => {
                bases.insert(lba, b);
            }
            Err(e) => {
                // The first error wins: a poisoning (see `fail_everything`) stays the answer.
                error.get_or_insert(e);
            }
        }
        *outstanding -= 1;
        if *outstanding == 0 {
            let Some(Stall::Rmw { op, bases, error, .. }) = self.intake.stall.take() else { unreachable!() };
            match error {
                Some(e) => op.done.send(Err(e)),
                None => self.finish_intake(op, bases),
            }
        }
    }
}

impl Request {
    /// Whether a poisoned engine refuses it: everything that writes, or promises durability.
    fn refused_when_poisoned(&self) -> bool {
        match self {
            Request::Flush { .. } => true,
            Request::Shutdown { .. } => false,
            _ => self.is_mutation(),
        }
    }

    /// Answers the request with an error.
    fn refuse(self, e: Error) {
        match self {
            Request::Read { reply, .. } => drop(reply.send(Err(e))),
            Request::Write { reply, .. }
            | Request::WriteBlocks { reply, .. }
            | Request::Trim { reply, .. }
            | Request::WriteZeroes { reply, .. } => drop(reply.send(Err(e))),
            Request::Flush { reply }
            | Request::ResizeVolume { reply, .. }
            | Request::DeleteVolume { reply, .. }
            | Request::SetRepl { reply, .. }
            | Request::Checkpoint { reply }
            | Request::Shutdown { reply } => drop(reply.send(Err(e))),
            Request::BlockStatus { reply, .. } => drop(reply.send(Err(e))),
            Request::BlockCrcs { reply, .. } => drop(reply.send(Err(e))),
            Request::BlockPlaces { reply, .. } => drop(reply.send(Err(e))),
            Request::ReadBlocks { reply, .. } => drop(reply.send(Err(e))),
            Request::CreateVolume { reply, .. } => drop(reply.send(Err(e))),
            Request::ListVolumes { reply } => drop(reply.send(Err(e))),
            Request::ChangedSince { reply, .. } => drop(reply.send(Err(e))),
            Request::Stats { reply } => drop(reply.send(Err(e))),
        }
    }
}
