//! Reading a segment image: the records of one segment, read whole, in log order. The cleaner and
//! the changed-block scans walk segments with it; recovery walks the log with it.

use crate::format::{Entry, RecordHeader, SegmentHeader, Superblock};
use crate::types::BLOCK_BYTES;

/// Decodes the records of a segment image (`buf` starts at the segment header) in log order,
/// calling `f(record, data_at)`, where `data_at` is the block index of the record's first data
/// block, until `f` returns `Ok(false)` or an error. Errors say where parsing stopped.
pub(crate) fn for_each_record(
    sb: &Superblock,
    buf: &[u8],
    mut f: impl FnMut(&RecordHeader, usize) -> Result<bool, String>,
) -> Result<(), String> {
    let n_blocks = buf.len() / BLOCK_BYTES;
    if n_blocks == 0 {
        return Err("empty segment image".into());
    }
    let sh = SegmentHeader::decode(&buf[..BLOCK_BYTES], sb.store_id).map_err(|e| format!("segment header: {e}"))?;
    let mut cursor = 1usize;
    while cursor < n_blocks {
        let rec = match RecordHeader::decode(&buf[cursor * BLOCK_BYTES..], sb.store_id) {
            Ok(r) if r.segment_seq == sh.seq => r,
            Ok(_) => return Err(format!("record at block {cursor} belongs to another segment generation")),
            Err(e) => return Err(format!("record at block {cursor}: {e}")),
        };
        let data_at = cursor + rec.header_blocks() as usize;
        if !f(&rec, data_at)? {
            return Ok(());
        }
        cursor = data_at + rec.data_blocks() as usize;
    }
    Ok(())
}

const RUNS_PAST_END: &str = "record runs past the written part of the segment";

/// Walks the records of a segment image, calling `f(record, first_data_phys)` for each whole one.
pub(crate) fn walk_records(
    sb: &Superblock,
    seg: u32,
    buf: &[u8],
    mut f: impl FnMut(&RecordHeader, u32),
) -> Result<(), String> {
    let n_blocks = buf.len() / BLOCK_BYTES;
    for_each_record(sb, buf, |rec, data_at| {
        if data_at + rec.data_blocks() as usize > n_blocks {
            return Err(RUNS_PAST_END.into());
        }
        f(rec, seg * sb.segment_blocks + data_at as u32);
        Ok(true)
    })
}

/// Walks the records of a segment image, calling `f(entry, lba, phys, block_idx, crc)` for every
/// data block until it returns false. Errors say where parsing stopped; blocks before that point
/// (even of a record cut short) have been visited.
pub(crate) fn walk_data_blocks(
    sb: &Superblock,
    seg: u32,
    buf: &[u8],
    mut f: impl FnMut(&Entry, u64, u32, usize, u32) -> bool,
) -> Result<(), String> {
    let n_blocks = buf.len() / BLOCK_BYTES;
    for_each_record(sb, buf, |rec, data_at| {
        let mut d = 0usize;
        for e in rec.entries.iter().filter(|e| e.kind.has_data()) {
            for i in 0..e.n_blocks as u64 {
                let block_idx = data_at + d;
                if block_idx >= n_blocks {
                    return Err(RUNS_PAST_END.into());
                }
                let phys = seg * sb.segment_blocks + block_idx as u32;
                if !f(e, e.lba.0 + i, phys, block_idx, rec.crcs[d]) {
                    return Ok(false);
                }
                d += 1;
            }
        }
        Ok(true)
    })
}
