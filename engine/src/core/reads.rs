//! Reads: client reads served from the unapplied writes and the index, with one device read per
//! run of physically consecutive blocks; block status and block checksums, answered from memory;
//! and, for a replica's copy, where a volume's blocks lie in the log ([`Core::block_places`]) and
//! reads of scattered blocks in log order ([`Core::handle_read_blocks`]).
//!
//! Every block read from the device is checked against the checksum the index holds for it
//! (written at intake, checked again before the write): a mismatch is an error naming the segment
//! and device offset, never silently returned data.

use super::*;

/// Reads waiting for the device.
#[derive(Default)]
pub(super) struct Reads {
    pub(super) waiting: HashMap<u64, ReadWaiter, BlockHash>,
    /// Reads of scattered blocks ([`Request::ReadBlocks`]) waiting for their device reads.
    pub(super) scattered: HashMap<u64, BlocksWaiter, BlockHash>,
    pub(super) next_id: u64,
}

/// One device read of a client read: `n_blocks` blocks at `phys`, going to block `block_idx` of
/// the reply.
pub(super) struct ReadPart {
    read_id: u64,
    block_idx: usize,
    n_blocks: usize,
    pub(super) seg: u32,
    crcs: Vec<u32>,
    phys: u32,
}

/// Most blocks one [`Request::BlockCrcs`] may cover: 256 MiB of volume, a 512 KiB answer. A
/// replicator compares checksums window by window; this bounds the memory one request pins.
pub const CRC_BLOCKS_MAX: u64 = 1 << 16;

/// Most blocks one [`Request::ReadBlocks`] or [`Request::WriteBlocks`] may name: as much data as
/// [`IO_BYTES_MAX`], for the same reason (it bounds the memory one request pins).
pub const SCATTERED_BLOCKS_MAX: usize = (IO_BYTES_MAX / BB) as usize;

/// Most blocks one [`Request::BlockPlaces`] may cover: 4 GiB of volume, an answer of 12 MiB at
/// most. A replica's copy plans this much at a time.
pub const PLACES_BLOCKS_MAX: u64 = 1 << 20;

/// Longest device read of a read of scattered blocks: 1 MiB, the size of the log's batches.
const SCATTERED_RUN_BLOCKS_MAX: u32 = 256;

/// Where a block of a volume lies, for reading blocks in log order (see [`Core::block_places`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct BlockPlace {
    /// 0 for a block not yet in the log (an unapplied write, served from memory); otherwise the
    /// block's place in the log, plus one. Blocks sorted by it are in the order of the device.
    pub place: u32,
    pub lba: u64,
}

/// One device read of a read of scattered blocks: `n_blocks` at `phys`, of which `wanted` go to
/// the answer (block within the read, its checksum, its index in the answer).
pub(super) struct BlocksPart {
    read_id: u64,
    pub(super) seg: u32,
    phys: u32,
    n_blocks: u32,
    wanted: Vec<(u32, u32, u32)>,
}

/// A read of scattered blocks waiting for its device reads.
pub(super) struct BlocksWaiter {
    out: Vec<Option<Bytes>>,
    parts: Parts,
    reply: Reply<Vec<Option<Bytes>>>,
}

/// A read waiting for its device reads.
pub(super) struct ReadWaiter {
    /// None when one device read covers the whole reply (its buffer becomes the reply).
    pub(super) buf: Option<BytesMut>,
    pub(super) head: usize,
    pub(super) len: usize,
    pub(super) parts: Parts,
    pub(super) reply: Reply<Bytes>,
}

/// The device reads a read is still waiting for, and the first error one of them had.
pub(super) struct Parts {
    remaining: usize,
    error: Option<Error>,
}

impl Parts {
    fn new(remaining: usize) -> Parts {
        Parts { remaining, error: None }
    }

    /// One device read returned (with `error`, kept if it is the first); true once all have.
    fn done(&mut self, error: Option<Error>) -> bool {
        if self.error.is_none() {
            self.error = error;
        }
        self.remaining -= 1;
        self.remaining == 0
    }
}

impl Core {
    /// Serves a read from the pending blocks and the index: one device read per run of physically
    /// consecutive blocks, each checked against its checksum when it returns.
    pub(super) fn handle_read(&mut self, volume: VolumeId, offset: u64, len: u64, reply: Reply<Bytes>) {
        if len > IO_BYTES_MAX {
            let _ = reply.send(Err(Error::TooLarge { len, limit: IO_BYTES_MAX }));
            return;
        }
        if let Err(e) = self.check_range(volume, offset, len) {
            let _ = reply.send(Err(e));
            return;
        }
        if len == 0 {
            let _ = reply.send(Ok(Bytes::new()));
            return;
        }
        let first = offset / BB;
        let last = (offset + len - 1) / BB;
        let n_blocks = (last - first + 1) as usize;
        // Allocated only when the reply is assembled from several sources; a read served by one
        // device run is handed back in the device's own buffer, without a copy.
        let mut buf: Option<BytesMut> = None;
        fn assembled(buf: &mut Option<BytesMut>, n_blocks: usize) -> &mut BytesMut {
            buf.get_or_insert_with(|| BytesMut::zeroed(n_blocks * BLOCK_BYTES))
        }
        // Runs of physically consecutive blocks: (block_idx, phys, crcs).
        let mut runs: Vec<(usize, u32, Vec<u32>)> = Vec::new();
        {
            let vol = self.state.volumes.get(&volume).expect("checked");
            for i in 0..n_blocks {
                let lba = first + i as u64;
                if let Some(p) = self.log.pending.get(&(volume, lba)) {
                    let b = assembled(&mut buf, n_blocks);
                    if let Some(data) = &p.data {
                        b[i * BLOCK_BYTES..(i + 1) * BLOCK_BYTES].copy_from_slice(data);
                    }
                    continue;
                }
                if self.log.pending_unmaps.iter().any(|u| u.covers(volume, lba)) {
                    continue;
                }
                let entry = vol.effective(lba);
                let Some(phys) = phys_of(entry) else { continue };
                match runs.last_mut() {
                    Some((idx, p, crcs))
                        if *idx + crcs.len() == i
                            && *p + crcs.len() as u32 == phys
                            && (phys % self.sb.segment_blocks) != 0 =>
                    {
                        crcs.push(crc_of(entry));
                    }
                    _ => runs.push((i, phys, vec![crc_of(entry)])),
                }
            }
        }
        let head = (offset - first * BB) as usize;
        if runs.is_empty() {
            let b = assembled(&mut buf, n_blocks);
            let _ = reply.send(Ok(std::mem::take(b).freeze().slice(head..head + len as usize)));
            return;
        }
        if !(runs.len() == 1 && runs[0].0 == 0 && runs[0].2.len() == n_blocks && buf.is_none()) {
            assembled(&mut buf, n_blocks);
        }
        let read_id = self.reads.next_id;
        self.reads.next_id += 1;
        self.reads
            .waiting
            .insert(read_id, ReadWaiter { buf, head, len: len as usize, parts: Parts::new(runs.len()), reply });
        for (block_idx, phys, crcs) in runs {
            let seg = phys / self.sb.segment_blocks;
            self.segments.table[seg as usize].readers += 1;
            let n = crcs.len();
            let offset = self.phys_offset_bytes(phys);
            self.submit(
                Token::Read(ReadPart { read_id, block_idx, n_blocks: n, seg, crcs, phys }),
                IoKind::Read { offset, buf: AlignedBuf::zeroed(n) },
            );
        }
    }

    pub(super) fn corrupt_error(&self, seg: u32, phys: u32, what: String) -> Error {
        let st = &self.segments.table[seg as usize];
        Error::Corrupt {
            segment: SegmentId(seg),
            lsn_range: format!("{}..={}", st.min_data_lsn, st.max_lsn),
            offset: self.phys_offset_bytes(phys),
            what,
        }
    }

    /// Answered at intake, like a read: the index holds every applied write; the unapplied ones
    /// (`pending`, `pending_unmaps`) are newer, and `pending` newer than `pending_unmaps` (an unmap
    /// clears the pending blocks it covers), the same precedence as `current_block`.
    pub(super) fn block_crcs(&self, volume: VolumeId, offset: u64, len: u64) -> Result<Vec<Option<u32>>> {
        self.check_range(volume, offset, len)?;
        if offset % BB != 0 || len % BB != 0 {
            return Err(Error::InvalidArgument(format!(
                "block checksums need a block-aligned range, got {len} bytes at {offset}"
            )));
        }
        if len / BB > CRC_BLOCKS_MAX {
            return Err(Error::TooLarge { len, limit: CRC_BLOCKS_MAX * BB });
        }
        let vol = self.state.volumes.get(&volume).expect("checked");
        let (first, end) = (offset / BB, (offset + len) / BB);
        let mut out = vec![None; (end - first) as usize];
        vol.for_each_effective(first, end, |lba, e| out[(lba - first) as usize] = Some(crc_of(e)));
        for u in &self.log.pending_unmaps {
            if u.volume == volume {
                for lba in u.lbas.start.max(first)..u.lbas.end.min(end) {
                    out[(lba - first) as usize] = None;
                }
            }
        }
        for (&(v, lba), p) in &self.log.pending {
            if v == volume && (first..end).contains(&lba) {
                out[(lba - first) as usize] = p.data.as_deref().map(block_crc);
            }
        }
        Ok(out)
    }

    pub(super) fn block_status(&self, volume: VolumeId, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check_range(volume, offset, len)?;
        let vol = self.state.volumes.get(&volume).expect("checked");
        let end = offset + len;
        let first = offset / BB;
        let last = end.div_ceil(BB);
        let mut extents: Vec<Extent> = Vec::new();
        let mut push = |start: u64, stop: u64, mapped: bool| {
            let (start, stop) = (start.max(offset), stop.min(end));
            if stop <= start {
                return;
            }
            match extents.last_mut() {
                Some(e) if e.mapped == mapped && e.range.end() == start => e.range.len += stop - start,
                _ => extents.push(Extent { range: ByteRange { offset: start, len: stop - start }, mapped }),
            }
        };
        let mut cursor = first;
        let mut mapped_lbas = Vec::new();
        vol.for_each_effective(first, last, |lba, _| mapped_lbas.push(lba));
        for (key, p) in &self.log.pending {
            if key.0 == volume && (first..last).contains(&key.1) && p.data.is_some() {
                mapped_lbas.push(key.1);
            }
        }
        mapped_lbas.sort_unstable();
        mapped_lbas.dedup();
        for lba in mapped_lbas {
            if lba > cursor {
                push(cursor * BB, lba * BB, false);
            }
            push(lba * BB, (lba + 1) * BB, true);
            cursor = lba + 1;
        }
        if cursor < last {
            push(cursor * BB, last * BB, false);
        }
        Ok(extents)
    }

    /// One device read of a client read returned; the reply goes once all have.
    pub(super) fn read_done(&mut self, part: ReadPart, c: Completion) {
        let ReadPart { read_id, block_idx, n_blocks, seg, crcs, phys } = part;
        self.release_reader(seg);
        let checks = crcs.iter().enumerate().map(|(i, &crc)| (i as u32, crc));
        let mut direct = None;
        let error = match self.checked_read(seg, phys, c, checks) {
            Ok(buf) => {
                if let Some(w) = self.reads.waiting.get_mut(&read_id) {
                    match &mut w.buf {
                        Some(b) => {
                            b[block_idx * BLOCK_BYTES..(block_idx + n_blocks) * BLOCK_BYTES].copy_from_slice(&buf)
                        }
                        None => direct = Some(buf),
                    }
                }
                None
            }
            Err(e) => Some(e),
        };
        let Some(w) = self.reads.waiting.get_mut(&read_id) else { return };
        if w.parts.done(error) {
            let w = self.reads.waiting.remove(&read_id).expect("read waiter");
            let data = match (w.buf, direct) {
                (Some(b), _) => Some(b.freeze()),
                (None, Some(d)) => Some(Bytes::from_owner(d)),
                (None, None) => None,
            };
            let _ = w.reply.send(match (w.parts.error, data) {
                (Some(e), _) => Err(e),
                (None, Some(d)) => Ok(d.slice(w.head..w.head + w.len)),
                (None, None) => Err(Error::InvalidArgument("read completed without data".into())),
            });
        }
    }

    /// The buffer of a completed device read of blocks from `phys` (in segment `seg`), with block
    /// `at` of it checked against checksum `crc` for each `(at, crc)` of `checks`: a failed read is
    /// an I/O error naming the device offset, a mismatch a corruption error (logged) naming the
    /// segment and the block.
    fn checked_read(
        &self,
        seg: u32,
        phys: u32,
        c: Completion,
        checks: impl IntoIterator<Item = (u32, u32)>,
    ) -> Result<AlignedBuf> {
        let buf = match (c.result, c.buf) {
            (Ok(()), Some(buf)) => buf,
            (Err(e), _) => return Err(Error::io(format!("read at device offset {}", self.phys_offset_bytes(phys)), e)),
            (Ok(()), None) => return Err(Error::InvalidArgument("read returned no buffer".into())),
        };
        for (at, expected) in checks {
            let got = block_crc(buf.block(at as usize));
            if got != expected {
                let what = format!("block checksum {got:#010x}, expected {expected:#010x}");
                let e = self.corrupt_error(seg, phys + at, what);
                tracing::error!("{e}");
                return Err(e);
            }
        }
        Ok(buf)
    }
}

impl Core {
    /// The mapped blocks of `runs` (sorted, not overlapping) and where each lies, in LBA order: as
    /// of every request queued before this one, unapplied writes included (place 0). Unmapped
    /// blocks are left out. Answered from memory.
    pub(super) fn block_places(&self, volume: VolumeId, runs: &[BlockRun]) -> Result<Vec<BlockPlace>> {
        let size = self.state.volumes.get(&volume).ok_or(Error::NoSuchVolume(volume))?.size_bytes;
        let mut total = 0u64;
        let mut prev_end = 0;
        for r in runs {
            let end = r.lba.0.checked_add(r.n_blocks).filter(|&e| e.checked_mul(BB).is_some_and(|b| b <= size));
            let Some(end) = end.filter(|_| r.lba.0 >= prev_end) else {
                return Err(Error::InvalidArgument(format!(
                    "block places need sorted, disjoint runs inside the volume ({size} bytes), got {} blocks at {}",
                    r.n_blocks, r.lba.0
                )));
            };
            prev_end = end;
            total += r.n_blocks;
        }
        if total > PLACES_BLOCKS_MAX {
            return Err(Error::TooLarge { len: total * BB, limit: PLACES_BLOCKS_MAX * BB });
        }
        let vol = self.state.volumes.get(&volume).expect("checked");
        let inside = |lba: u64| {
            let i = runs.partition_point(|r| r.lba.0 + r.n_blocks <= lba);
            runs.get(i).is_some_and(|r| r.lba.0 <= lba)
        };
        // The unapplied writes are newer than the index: the blocks they name are placed from them.
        let mut unapplied: Vec<u64> = Vec::new();
        let mut pending_in_runs = false;
        for (&(v, lba), p) in &self.log.pending {
            if v == volume && inside(lba) {
                pending_in_runs = true;
                if p.data.is_some() {
                    unapplied.push(lba);
                }
            }
        }
        unapplied.sort_unstable();
        let unmaps: Vec<&std::ops::Range<u64>> =
            self.log.pending_unmaps.iter().filter(|u| u.volume == volume).map(|u| &u.lbas).collect();
        let mut out = Vec::with_capacity(total.min(vol.index.n_mapped()) as usize);
        let mut next_unapplied = unapplied.iter().copied().peekable();
        for r in runs {
            vol.for_each_effective(r.lba.0, r.lba.0 + r.n_blocks, |lba, e| {
                while let Some(u) = next_unapplied.next_if(|&u| u < lba) {
                    out.push(BlockPlace { place: 0, lba: u });
                }
                if (pending_in_runs && self.log.pending.contains_key(&(volume, lba)))
                    || unmaps.iter().any(|u| u.contains(&lba))
                {
                    return;
                }
                if let Some(phys) = phys_of(e) {
                    out.push(BlockPlace { place: phys + 1, lba });
                }
            });
        }
        out.extend(next_unapplied.map(|lba| BlockPlace { place: 0, lba }));
        Ok(out)
    }

    /// Reads the blocks `lbas` names (any order), as of every request queued before this one: one
    /// device read per run of blocks next to each other in the log, each block checked against
    /// its checksum.
    ///
    /// A run never reads through blocks it does not want (older versions the cleaner has not yet
    /// reclaimed). Reading through short gaps of up to 8 blocks saves device requests, and was
    /// faster while every node of a benchmark shared one disk. But a node with a disk of its own
    /// is bound by its reads' bytes: copying a volume scattered by random writes, that read 1.4
    /// times the data, and the copy ran at 0.69–0.70 of the disk's rate against 0.96–0.97 without
    /// gaps (docs/cluster.md, "Re-protection", session 20). An SSD's extra request for a run costs
    /// about as much as reading one or two 4 KiB blocks more, so a gap of one block would roughly
    /// break even; none is simplest. Answers each block in the order asked, `None` for an
    /// unmapped one.
    pub(super) fn handle_read_blocks(&mut self, volume: VolumeId, lbas: Vec<u64>, reply: Reply<Vec<Option<Bytes>>>) {
        let check = check_scattered(lbas.len())
            .and_then(|()| self.volume_exists(volume))
            .and_then(|()| lbas.iter().try_for_each(|&lba| self.check_block(volume, lba)));
        if let Err(e) = check {
            let _ = reply.send(Err(e));
            return;
        }
        let mut out: Vec<Option<Bytes>> = vec![None; lbas.len()];
        // (place, checksum, index in the answer) of the blocks to read from the device.
        let mut wanted: Vec<(u32, u32, u32)> = Vec::new();
        {
            let vol = self.state.volumes.get(&volume).expect("checked");
            for (i, &lba) in lbas.iter().enumerate() {
                if let Some(p) = self.log.pending.get(&(volume, lba)) {
                    out[i] = p.data.clone();
                    continue;
                }
                if self.log.pending_unmaps.iter().any(|u| u.covers(volume, lba)) {
                    continue;
                }
                let entry = vol.effective(lba);
                if let Some(phys) = phys_of(entry) {
                    wanted.push((phys, crc_of(entry), i as u32));
                }
            }
        }
        wanted.sort_unstable();
        let seg_blocks = self.sb.segment_blocks;
        let mut parts: Vec<BlocksPart> = Vec::new();
        let read_id = self.reads.next_id;
        for (phys, crc, i) in wanted {
            match parts.last_mut() {
                Some(p)
                    if p.seg == phys / seg_blocks
                        // (`<=`: the next block, or the same one asked for twice)
                        && phys <= p.phys + p.n_blocks
                        && phys < p.phys + SCATTERED_RUN_BLOCKS_MAX =>
                {
                    p.n_blocks = p.n_blocks.max(phys - p.phys + 1);
                    p.wanted.push((phys - p.phys, crc, i));
                }
                _ => parts.push(BlocksPart {
                    read_id,
                    seg: phys / seg_blocks,
                    phys,
                    n_blocks: 1,
                    wanted: vec![(0, crc, i)],
                }),
            }
        }
        if parts.is_empty() {
            let _ = reply.send(Ok(out));
            return;
        }
        self.reads.next_id += 1;
        self.reads.scattered.insert(read_id, BlocksWaiter { out, parts: Parts::new(parts.len()), reply });
        for part in parts {
            self.segments.table[part.seg as usize].readers += 1;
            let (offset, n) = (self.phys_offset_bytes(part.phys), part.n_blocks as usize);
            self.submit(Token::Blocks(part), IoKind::Read { offset, buf: AlignedBuf::zeroed(n) });
        }
    }

    /// One device read of a read of scattered blocks returned; the answer goes once all have.
    pub(super) fn blocks_read_done(&mut self, part: BlocksPart, c: Completion) {
        let BlocksPart { read_id, seg, phys, wanted, .. } = part;
        self.release_reader(seg);
        let error = match self.checked_read(seg, phys, c, wanted.iter().map(|&(at, crc, _)| (at, crc))) {
            Ok(buf) => {
                if let Some(w) = self.reads.scattered.get_mut(&read_id) {
                    let buf = Bytes::from_owner(buf);
                    for (at, _, i) in wanted {
                        let at = at as usize * BLOCK_BYTES;
                        w.out[i as usize] = Some(buf.slice(at..at + BLOCK_BYTES));
                    }
                }
                None
            }
            Err(e) => Some(e),
        };
        let Some(w) = self.reads.scattered.get_mut(&read_id) else { return };
        if w.parts.done(error) {
            let w = self.reads.scattered.remove(&read_id).expect("read waiter");
            let _ = w.reply.send(match w.parts.error {
                Some(e) => Err(e),
                None => Ok(w.out),
            });
        }
    }
}
