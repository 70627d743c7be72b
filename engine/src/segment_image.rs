//! Reading a segment image: the records of one segment, read whole (or up to its used blocks), in
//! log order. One iterator, [`Records`], serves every reader of segments: recovery's replay and
//! its look past the log's end, the cleaner and the changed-block scans.
//!
//! The iterator checks what makes a block the next record of this segment generation: its header
//! decodes (magic, version, store, header checksum), it names this generation, and its data lies
//! inside the image. What a record must be beyond that (the expected LSN, data checksums, live
//! blocks) is for its caller to judge.

use crate::format::{DecodeError, Entry, RecordHeader, SegmentHeader, Superblock};
use crate::types::{Lsn, BLOCK_BYTES};

/// The records of one segment image, from a given block on.
pub(crate) struct Records<'a> {
    buf: &'a [u8],
    store_id: u64,
    /// The generation (segment seq) whose records these are.
    seq: u64,
    cursor: usize,
    n_blocks: usize,
}

/// One record found in an image.
pub(crate) struct Record {
    pub header: RecordHeader,
    /// Block of the image where the record's header starts.
    pub at: usize,
    /// Block of the image where its data starts.
    pub data_at: usize,
}

/// Why a walk stopped before the end of the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Stop {
    /// Block 0 is not this store's segment header.
    NoSegmentHeader(DecodeError),
    /// The block at `block` is not a record header: unwritten or stale space, or a header torn by
    /// a crash (then the error is a checksum mismatch).
    NoRecord { block: usize, error: DecodeError },
    /// A valid record of another generation of this segment (an older lap of the log).
    OtherGeneration { block: usize, lsn: Lsn, seq: u64 },
    /// A valid record header whose data runs past the end of the image. Its header was verified,
    /// so what it claims (`durable_lsn`) still counts.
    RunsPastEnd { block: usize, lsn: Lsn, durable_lsn: Lsn },
}

impl Stop {
    /// The block of the image where the walk stopped.
    pub(crate) fn block(&self) -> usize {
        match self {
            Stop::NoSegmentHeader(_) => 0,
            Stop::NoRecord { block, .. } | Stop::OtherGeneration { block, .. } | Stop::RunsPastEnd { block, .. } => {
                *block
            }
        }
    }
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stop::NoSegmentHeader(e) => write!(f, "segment header: {e}"),
            Stop::NoRecord { block, error } => write!(f, "no valid record at block {block} ({error})"),
            Stop::OtherGeneration { block, lsn, seq } => {
                write!(f, "record at block {block} (LSN {lsn}) belongs to segment generation {seq}")
            }
            Stop::RunsPastEnd { block, lsn, .. } => {
                write!(f, "record at block {block} (LSN {lsn}) runs past the written part of the segment")
            }
        }
    }
}

impl<'a> Records<'a> {
    /// The records of generation `seq` in `buf` (which starts at the segment's block 0), from block
    /// `from` (at least 1: block 0 is the segment header).
    pub(crate) fn new(buf: &'a [u8], store_id: u64, seq: u64, from: usize) -> Records<'a> {
        Records { buf, store_id, seq, cursor: from.max(1), n_blocks: buf.len() / BLOCK_BYTES }
    }

    /// The records of the generation the image's own segment header names.
    pub(crate) fn of_image(buf: &'a [u8], store_id: u64) -> Result<Records<'a>, Stop> {
        let head = buf
            .get(..BLOCK_BYTES)
            .ok_or(Stop::NoSegmentHeader(DecodeError::Truncated { need: BLOCK_BYTES, have: buf.len() }))?;
        let sh = SegmentHeader::decode(head, store_id).map_err(Stop::NoSegmentHeader)?;
        Ok(Records::new(buf, store_id, sh.seq, 1))
    }

    /// The next record; `Ok(None)` at the end of the image, and after an error (a stop ends the
    /// walk).
    pub(crate) fn next_record(&mut self) -> Result<Option<Record>, Stop> {
        let block = self.cursor;
        if block >= self.n_blocks {
            return Ok(None);
        }
        // Whatever happens below, a stop ends the walk.
        self.cursor = self.n_blocks;
        let header = RecordHeader::decode(&self.buf[block * BLOCK_BYTES..], self.store_id)
            .map_err(|error| Stop::NoRecord { block, error })?;
        if header.segment_seq != self.seq {
            return Err(Stop::OtherGeneration { block, lsn: header.lsn, seq: header.segment_seq });
        }
        let data_at = block + header.header_blocks() as usize;
        let end = data_at + header.data_blocks() as usize;
        if end > self.n_blocks {
            return Err(Stop::RunsPastEnd { block, lsn: header.lsn, durable_lsn: header.durable_lsn });
        }
        self.cursor = end;
        Ok(Some(Record { header, at: block, data_at }))
    }
}

/// Walks the whole records of a segment image (read from block 0), calling `f(record,
/// first_data_phys)` for each. Stops at the first block that is not one.
pub(crate) fn walk_records(
    sb: &Superblock,
    seg: u32,
    buf: &[u8],
    mut f: impl FnMut(&RecordHeader, u32),
) -> Result<(), Stop> {
    let mut records = Records::of_image(buf, sb.store_id)?;
    while let Some(r) = records.next_record()? {
        f(&r.header, seg * sb.segment_blocks + r.data_at as u32);
    }
    Ok(())
}

/// Walks the data blocks of a segment image (read from block 0), calling `f(entry, lba, phys,
/// block_idx, crc)` for each until it returns false. A record cut short by the end of the image is
/// not visited.
pub(crate) fn walk_data_blocks(
    sb: &Superblock,
    seg: u32,
    buf: &[u8],
    mut f: impl FnMut(&Entry, u64, u32, usize, u32) -> bool,
) -> Result<(), Stop> {
    let mut records = Records::of_image(buf, sb.store_id)?;
    while let Some(r) = records.next_record()? {
        let mut d = 0usize;
        for e in r.header.entries.iter().filter(|e| e.kind.has_data()) {
            for i in 0..e.n_blocks as u64 {
                let block_idx = r.data_at + d;
                let phys = seg * sb.segment_blocks + block_idx as u32;
                if !f(e, e.lba.0 + i, phys, block_idx, r.header.crcs[d]) {
                    return Ok(());
                }
                d += 1;
            }
        }
    }
    Ok(())
}
