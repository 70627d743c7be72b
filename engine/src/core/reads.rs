//! Reads: client reads served from the unapplied writes and the index, with one device read per
//! run of physically consecutive blocks; block status and block checksums, answered from memory.
//!
//! Every block read from the device is checked against the checksum the index holds for it
//! (written at intake, checked again before the write): a mismatch is an error naming the segment
//! and device offset, never silently returned data.

use super::*;

/// Reads waiting for the device.
#[derive(Default)]
pub(super) struct Reads {
    pub(super) waiting: HashMap<u64, ReadWaiter, BlockHash>,
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

/// A read waiting for its device reads.
pub(super) struct ReadWaiter {
    /// None when one device read covers the whole reply (its buffer becomes the reply).
    pub(super) buf: Option<BytesMut>,
    pub(super) head: usize,
    pub(super) len: usize,
    pub(super) remaining: usize,
    pub(super) error: Option<Error>,
    pub(super) reply: Reply<Bytes>,
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
            .insert(read_id, ReadWaiter { buf, head, len: len as usize, remaining: runs.len(), error: None, reply });
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
        let result =
            c.result.map_err(|e| Error::io(format!("read at device offset {}", self.phys_offset_bytes(phys)), e));
        let mut error = None;
        let mut direct = None;
        match (result, c.buf) {
            (Ok(()), Some(buf)) => {
                for (i, expected) in crcs.iter().enumerate() {
                    let got = block_crc(buf.block(i));
                    if got != *expected {
                        let e = self.corrupt_error(
                            seg,
                            phys + i as u32,
                            format!("block checksum {got:#010x}, expected {expected:#010x}"),
                        );
                        tracing::error!("{e}");
                        error = Some(e);
                        break;
                    }
                }
                if error.is_none() {
                    if let Some(w) = self.reads.waiting.get_mut(&read_id) {
                        match &mut w.buf {
                            Some(b) => {
                                b[block_idx * BLOCK_BYTES..(block_idx + n_blocks) * BLOCK_BYTES].copy_from_slice(&buf)
                            }
                            None => direct = Some(buf),
                        }
                    }
                }
            }
            (Err(e), _) => error = Some(e),
            (Ok(()), None) => error = Some(Error::InvalidArgument("read returned no buffer".into())),
        }
        let Some(w) = self.reads.waiting.get_mut(&read_id) else { return };
        if w.error.is_none() {
            w.error = error;
        }
        w.remaining -= 1;
        if w.remaining == 0 {
            let w = self.reads.waiting.remove(&read_id).expect("read waiter");
            let data = match (w.buf, direct) {
                (Some(b), _) => Some(b.freeze()),
                (None, Some(d)) => Some(Bytes::from_owner(d)),
                (None, None) => None,
            };
            let _ = w.reply.send(match (w.error, data) {
                (Some(e), _) => Err(e),
                (None, Some(d)) => Ok(d.slice(w.head..w.head + w.len)),
                (None, None) => Err(Error::InvalidArgument("read completed without data".into())),
            });
        }
    }
}
