//! Formatting a device and recovering a store from it: superblock, newest valid checkpoint, then
//! replay of the log written since, stopping at the first record that does not verify.
//!
//! The crash cases this code handles are walked through in `docs/format.md`.

use std::collections::BTreeMap;

use crate::buf::AlignedBuf;
use crate::checkpoint::SegmentRec;
use crate::checkpoint::{max_payload_bytes, CheckpointData};
use crate::core::{Config, Core, SegState, SegStatus};
use crate::device::{read_blocking, sync_blocking, write_blocking, Device, IoKind, IoOp};
use crate::error::{Error, Result};
use crate::format::{
    block_crc, CheckpointHeader, DecodeError, MetaOp, RecordHeader, RecordKind, SegmentHeader, Superblock,
};
use crate::index::phys_of;
use crate::state::{Staged, State, Volume, MAX_VOLUMES};
use crate::types::{Lsn, SegmentId, VolumeId, BLOCK_BYTES, BLOCK_BYTES_U64 as BB};

/// Smallest segment: 16 blocks (64 KiB). Tests use tiny segments to reach the cleaner quickly;
/// production stores should use the default.
pub const MIN_SEGMENT_BYTES: u64 = 16 * BB;
/// Default segment: 8 MiB. Large enough that cleaning reads and log writes are long sequential
/// transfers, small enough that a 10 GiB store has over a thousand segments to choose victims from.
pub const DEFAULT_SEGMENT_BYTES: u64 = 8 << 20;
/// Fewest segments a store may have: two for the cleaner's reserve and two for data.
const MIN_SEGMENTS: u32 = 4;
/// Segment headers read per device round during recovery: bounds recovery's memory to 4 MiB.
const HEADER_READ_CHUNK: usize = 1024;

/// Writes an empty store onto `device`.
/// The largest store: block numbers on the device are 32-bit.
pub const MAX_STORE_BYTES: u64 = (u32::MAX as u64 - 2) * BB;

/// The smallest device a store with `segment_bytes`-byte segments fits on: the superblocks, two
/// checkpoint slots and [`MIN_SEGMENTS`] segments.
pub fn min_store_bytes(segment_bytes: u64) -> u64 {
    let segment_blocks = segment_bytes / BB;
    let n = MIN_SEGMENTS as u64;
    let payload = max_payload_bytes(n, n * segment_blocks, MAX_VOLUMES as u64);
    (2 + 2 * (1 + payload.div_ceil(BB)) + n * segment_blocks) * BB
}

pub fn format(device: &mut dyn Device, segment_bytes: u64) -> Result<Superblock> {
    if segment_bytes < MIN_SEGMENT_BYTES || segment_bytes % BB != 0 || segment_bytes > (1 << 30) {
        return Err(Error::InvalidArgument(format!(
            "segment size {segment_bytes} must be a multiple of 4096 between {MIN_SEGMENT_BYTES} and 1 GiB"
        )));
    }
    let device_bytes = device.len_bytes() / BB * BB;
    let total_blocks = device_bytes / BB;
    let segment_blocks = segment_bytes / BB;
    let mut n_segments = total_blocks.saturating_sub(2) / segment_blocks;
    let slot_blocks = loop {
        if n_segments < MIN_SEGMENTS as u64 {
            return Err(Error::InvalidArgument(format!(
                "a store of {device_bytes} bytes is too small: with {segment_bytes}-byte segments it needs at least {} bytes ({} segments)",
                min_store_bytes(segment_bytes),
                MIN_SEGMENTS
            )));
        }
        let payload = max_payload_bytes(n_segments, n_segments * segment_blocks, MAX_VOLUMES as u64);
        let slot_blocks = 1 + payload.div_ceil(BB);
        if 2 + 2 * slot_blocks + n_segments * segment_blocks <= total_blocks {
            break slot_blocks;
        }
        n_segments -= 1;
    };
    if n_segments * segment_blocks > u32::MAX as u64 - 2 {
        return Err(Error::InvalidArgument(format!(
            "device too large: at most {MAX_STORE_BYTES} bytes (16 TiB) per store"
        )));
    }
    let sb = Superblock {
        store_id: random_u64(),
        device_bytes,
        segment_blocks: segment_blocks as u32,
        n_segments: n_segments as u32,
        checkpoint_slot_blocks: slot_blocks,
        checkpoint_offsets: [2 * BB, (2 + slot_blocks) * BB],
        data_offset: (2 + 2 * slot_blocks) * BB,
    };
    // An empty checkpoint with seq 1 in slot 1, slot 0's header zeroed, then both superblock copies:
    // until the first superblock copy is durable, the device is not a store at all.
    let data = CheckpointData {
        next_volume_id: 1,
        volumes: vec![],
        segments: vec![
            SegmentRec {
                seq: 0,
                used_blocks: 0,
                min_data_lsn: 0,
                max_data_lsn: 0,
                max_lsn: 0,
                trim_tags: vec![],
            };
            n_segments as usize
        ],
        runs: vec![],
        entries: vec![],
    };
    let buf = checkpoint_buf(&sb, 1, Lsn(1), 1, (u32::MAX, 0, 0), &data);
    let io = |e| Error::io("formatting the store", e);
    write_blocking(device, sb.checkpoint_offsets[1], buf).map_err(io)?;
    write_blocking(device, sb.checkpoint_offsets[0], AlignedBuf::zeroed(1)).map_err(io)?;
    sync_blocking(device).map_err(io)?;
    write_blocking(device, 0, AlignedBuf::from_slice(&sb.encode())).map_err(io)?;
    sync_blocking(device).map_err(io)?;
    write_blocking(device, BB, AlignedBuf::from_slice(&sb.encode())).map_err(io)?;
    sync_blocking(device).map_err(io)?;
    Ok(sb)
}

/// Builds the bytes of a checkpoint slot.
pub(crate) fn checkpoint_buf(
    sb: &Superblock,
    seq: u64,
    next_lsn: Lsn,
    next_segment_seq: u64,
    tail: (u32, u32, u64),
    data: &CheckpointData,
) -> AlignedBuf {
    let payload = data.to_bytes();
    let header = CheckpointHeader {
        store_id: sb.store_id,
        seq,
        next_lsn,
        next_segment_seq,
        tail_segment: tail.0,
        tail_block: tail.1,
        tail_seq: tail.2,
        payload_bytes: payload.len() as u64,
        payload_crc: crc32fast::hash(&payload),
    };
    let mut buf = AlignedBuf::zeroed(1 + payload.len().div_ceil(BLOCK_BYTES));
    buf.block_mut(0).copy_from_slice(&header.encode());
    buf[BLOCK_BYTES..BLOCK_BYTES + payload.len()].copy_from_slice(&payload);
    buf
}

fn random_u64() -> u64 {
    let mut v = [0u8; 8];
    // SAFETY: getrandom writes at most 8 bytes into our 8-byte buffer.
    let n = unsafe { libc::getrandom(v.as_mut_ptr().cast(), 8, 0) };
    if n != 8 {
        // Fall back to time and address entropy; uniqueness, not secrecy, is what matters here.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        return t ^ (&v as *const _ as u64).rotate_left(32);
    }
    u64::from_le_bytes(v)
}

/// What recovery found, for logs and tests.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    pub checkpoint_seq: u64,
    pub checkpoint_fallback: Option<String>,
    pub records_replayed: u64,
    pub last_lsn: Lsn,
    /// Why replay stopped where it did.
    pub log_end: String,
    pub discarded_torn: Option<String>,
    pub discarded_segments: u32,
}

struct Ckpt {
    header: CheckpointHeader,
    data: CheckpointData,
}

fn read_superblock(device: &mut dyn Device, path: &str) -> Result<Superblock> {
    if device.len_bytes() < 2 * BB {
        let why = format!("shorter than a store's two superblocks, {} bytes", 2 * BB);
        return Err(Error::NotAStore { path: path.to_string(), why });
    }
    let buf = read_blocking(device, 0, 2).map_err(|e| Error::io("reading the superblock", e))?;
    let a = Superblock::decode(buf.block(0));
    let b = Superblock::decode(buf.block(1));
    match (a, b) {
        (Ok(a), Ok(b)) => {
            if a != b {
                tracing::warn!("superblock copies differ; using copy 0");
            }
            Ok(a)
        }
        (Ok(a), Err(e)) => {
            tracing::warn!("superblock copy 1 is damaged ({e}); using copy 0");
            Ok(a)
        }
        (Err(e), Ok(b)) => {
            tracing::warn!("superblock copy 0 is damaged ({e}); using copy 1");
            Ok(b)
        }
        (Err(DecodeError::BadVersion(v)), _) | (_, Err(DecodeError::BadVersion(v))) => {
            Err(Error::UnsupportedVersion { found: v, supported: crate::format::FORMAT_VERSION })
        }
        (Err(e), Err(_)) => Err(Error::NotAStore { path: path.to_string(), why: format!("superblock: {e}") }),
    }
}

fn read_checkpoint(device: &mut dyn Device, sb: &Superblock, slot: usize) -> Result<Ckpt, String> {
    let offset = sb.checkpoint_offsets[slot];
    let head = read_blocking(device, offset, 1).map_err(|e| format!("read failed: {e}"))?;
    let header = CheckpointHeader::decode(head.block(0), sb.store_id).map_err(|e| format!("header: {e}"))?;
    let n = 1 + header.payload_bytes.div_ceil(BB);
    if n > sb.checkpoint_slot_blocks {
        return Err("payload larger than its slot".into());
    }
    let buf = read_blocking(device, offset, n as usize).map_err(|e| format!("read failed: {e}"))?;
    let payload = &buf[BLOCK_BYTES..BLOCK_BYTES + header.payload_bytes as usize];
    let got = crc32fast::hash(payload);
    if got != header.payload_crc {
        return Err(format!("payload checksum {got:#010x}, expected {:#010x}", header.payload_crc));
    }
    let data = CheckpointData::from_bytes(payload)?;
    validate_checkpoint(sb, &header, &data)?;
    Ok(Ckpt { header, data })
}

fn validate_checkpoint(sb: &Superblock, h: &CheckpointHeader, d: &CheckpointData) -> Result<(), String> {
    if h.seq == 0
        || h.seq >= u64::MAX / 2
        || h.next_lsn.0 == 0
        || h.next_lsn.0 >= u64::MAX / 2
        || h.next_segment_seq == 0
        || h.next_segment_seq >= u64::MAX / 2
    {
        return Err("LSN or segment sequence out of range".into());
    }
    if h.tail_segment != u32::MAX && h.tail_seq >= h.next_segment_seq {
        return Err("tail segment newer than the next segment sequence".into());
    }
    if d.segments.len() != sb.n_segments as usize {
        return Err("segment table size does not match the superblock".into());
    }
    if d.volumes.len() > MAX_VOLUMES {
        return Err("too many volumes".into());
    }
    if h.tail_segment != u32::MAX && (h.tail_segment >= sb.n_segments || h.tail_block > sb.segment_blocks) {
        return Err("tail outside the data area".into());
    }
    let mut sizes = BTreeMap::new();
    for v in &d.volumes {
        if v.id >= d.next_volume_id || sizes.insert(v.id, v.size_bytes / BB).is_some() {
            return Err("volume table inconsistent".into());
        }
    }
    let data_blocks = sb.n_segments as u64 * sb.segment_blocks as u64;
    let mut n = 0u64;
    for r in &d.runs {
        let size = sizes.get(&r.volume).ok_or("run for a missing volume")?;
        if r.n_blocks == 0 || r.lba.checked_add(r.n_blocks as u64).is_none_or(|end| end > *size) {
            return Err("run outside its volume".into());
        }
        n += r.n_blocks as u64;
    }
    if n != d.entries.len() as u64 {
        return Err("runs do not account for the entries".into());
    }
    if d.entries.iter().any(|e| phys_of(*e).is_none_or(|p| p as u64 >= data_blocks)) {
        return Err("entry points outside the data area".into());
    }
    for v in &d.volumes {
        let size = sizes[&v.id];
        if v.staged.len() > crate::state::MAX_STAGED_BLOCKS + 1
            || v.staged_trims.len() > crate::state::MAX_STAGED_TRIMS + 1
            || v.staged.iter().any(|(lba, e)| *lba >= size || phys_of(*e).is_none_or(|p| p as u64 >= data_blocks))
            || v.staged_trims.iter().any(|(first, end)| first >= end || *end > size)
        {
            return Err("staged resync outside its volume or the data area".into());
        }
    }
    Ok(())
}

/// Recovers the store on `device` and returns a core ready to serve, plus what recovery did.
pub fn recover(device: &mut dyn Device, cfg: Config, path: &str) -> Result<(Core, RecoveryReport)> {
    let sb = read_superblock(device, path)?;
    if sb.device_bytes > device.len_bytes() {
        return Err(Error::CorruptStore(format!(
            "the store was formatted for {} bytes but the device has only {}; was it truncated?",
            sb.device_bytes,
            device.len_bytes()
        )));
    }
    let mut report = RecoveryReport::default();

    // Newest valid checkpoint.
    let slots = [read_checkpoint(device, &sb, 0), read_checkpoint(device, &sb, 1)];
    let (ckpt, other) = match slots {
        [Ok(a), Ok(b)] => {
            if a.header.seq > b.header.seq {
                (a, None)
            } else {
                (b, None)
            }
        }
        [Ok(a), Err(e)] => (a, Some((1, e))),
        [Err(e), Ok(b)] => (b, Some((0, e))),
        [Err(a), Err(b)] => {
            return Err(Error::CorruptStore(format!("both checkpoint slots are invalid (slot 0: {a}; slot 1: {b})")))
        }
    };
    if let Some((slot, why)) = other {
        // Normal after a crash during a checkpoint write (or on a fresh store, whose slot 0 is empty).
        if ckpt.header.seq > 1 {
            tracing::warn!(
                "checkpoint slot {slot} unusable ({why}); using checkpoint {} from the other slot",
                ckpt.header.seq
            );
            report.checkpoint_fallback = Some(format!("slot {slot}: {why}"));
        }
    }
    report.checkpoint_seq = ckpt.header.seq;

    // State from the checkpoint.
    let mut state = State::new(sb.n_segments, sb.segment_blocks);
    state.next_volume_id = ckpt.data.next_volume_id;
    for v in &ckpt.data.volumes {
        state.volumes.insert(
            VolumeId(v.id),
            Volume {
                last_tag: v.last_tag,
                trim_floor: v.trim_floor,
                attr: v.attr.clone(),
                staged: Staged {
                    writes: v.staged.iter().copied().collect(),
                    trims: v.staged_trims.clone(),
                    overflowed: v.resync_overflowed,
                },
                ..Volume::new(VolumeId(v.id), v.name.clone(), v.size_bytes)
            },
        );
        for (_, e) in &v.staged {
            state.live[(phys_of(*e).expect("validated") / sb.segment_blocks) as usize] += 1;
        }
    }
    let mut at = 0usize;
    for r in &ckpt.data.runs {
        let vol = state.volumes.get_mut(&VolumeId(r.volume)).expect("validated");
        for i in 0..r.n_blocks as u64 {
            let e = ckpt.data.entries[at];
            at += 1;
            vol.index.set(r.lba + i, e);
            state.live[(phys_of(e).expect("validated") / sb.segment_blocks) as usize] += 1;
        }
    }
    let mut segs: Vec<SegState> = ckpt.data.segments.iter().map(SegState::from_rec).collect();

    // Every segment header, to find the log written after the checkpoint.
    let mut headers: Vec<Option<SegmentHeader>> = vec![None; sb.n_segments as usize];
    for chunk_start in (0..sb.n_segments as usize).step_by(HEADER_READ_CHUNK) {
        let chunk_end = (chunk_start + HEADER_READ_CHUNK).min(sb.n_segments as usize);
        for s in chunk_start..chunk_end {
            device.submit(IoOp {
                token: s as u64,
                kind: IoKind::Read { offset: sb.segment_offset(s as u32), buf: AlignedBuf::zeroed(1) },
            });
        }
        let mut left = chunk_end - chunk_start;
        while left > 0 {
            device.wait().map_err(|e| Error::io("reading segment headers", e))?;
            while let Some(c) = device.pop_completion() {
                left -= 1;
                c.result.map_err(|e| Error::io(format!("reading the header of segment {}", c.token), e))?;
                let buf = c.buf.expect("read buffer");
                if let Ok(h) = SegmentHeader::decode(buf.block(0), sb.store_id) {
                    if h.segment == c.token as u32 {
                        headers[c.token as usize] = Some(h);
                    }
                }
            }
        }
    }
    let by_seq: BTreeMap<u64, u32> =
        headers.iter().enumerate().filter_map(|(i, h)| h.map(|h| (h.seq, i as u32))).collect();
    let max_seq_seen = by_seq.keys().next_back().copied().unwrap_or(0);

    // The chain to replay: the checkpoint's tail segment from its tail block, then segments with
    // consecutive seqs from next_segment_seq.
    let h = ckpt.header;
    let mut chain: Vec<(u32, u64, u32)> = Vec::new(); // (segment, seq, start block)
    if h.tail_segment != u32::MAX {
        chain.push((h.tail_segment, h.tail_seq, h.tail_block.max(1)));
    }
    let mut seq = h.next_segment_seq;
    while let Some(&s) = by_seq.get(&seq) {
        chain.push((s, seq, 1));
        seq += 1;
    }

    let mut expected = h.next_lsn;
    let mut max_durable = Lsn(0);
    let mut max_lsn_seen = Lsn(h.next_lsn.0 - 1);
    let mut stop: Option<(u32, u32, String, bool)> = None; // (segment, block, why, looks torn)
    let mut replayed_segments = 0usize;
    'chain: for (ci, &(seg, seg_seq, start)) in chain.iter().enumerate() {
        let hdr_ok = headers[seg as usize].is_some_and(|hh| hh.seq == seg_seq);
        if !hdr_ok {
            stop = Some((seg, 0, "segment header missing or from another generation".into(), false));
            break;
        }
        if ci > 0 && headers[seg as usize].map(|hh| hh.first_lsn) != Some(expected) {
            stop = Some((
                seg,
                1,
                format!("segment starts at {:?}, expected {expected:?}", headers[seg as usize].map(|hh| hh.first_lsn)),
                false,
            ));
            break;
        }
        let buf = read_blocking(device, sb.segment_offset(seg), sb.segment_blocks as usize)
            .map_err(|e| Error::io(format!("reading segment {seg} during recovery"), e))?;
        replayed_segments = ci + 1;
        let st = &mut segs[seg as usize];
        st.seq = seg_seq;
        if ci > 0 || h.tail_block == 0 {
            st.used_blocks = 1;
            st.min_data_lsn = 0;
            st.max_data_lsn = 0;
            st.trim_tags.clear();
        }
        let mut cursor = start as usize;
        loop {
            if cursor >= sb.segment_blocks as usize {
                continue 'chain;
            }
            let rec = match RecordHeader::decode(&buf[cursor * BLOCK_BYTES..], sb.store_id) {
                Ok(r) => r,
                Err(e) => {
                    let torn = matches!(e, DecodeError::BadChecksum { .. });
                    stop = Some((seg, cursor as u32, format!("no valid record ({e})"), torn));
                    // End of this segment's records: the next segment of the chain may continue.
                    if chain
                        .get(ci + 1)
                        .is_some_and(|&(s, _, _)| headers[s as usize].is_some_and(|hh| hh.first_lsn == expected))
                    {
                        stop = None;
                        continue 'chain;
                    }
                    scan_rest(&buf, cursor + 1, seg_seq, sb.store_id, &mut max_durable, &mut max_lsn_seen);
                    break 'chain;
                }
            };
            if rec.segment_seq != seg_seq || rec.lsn != expected {
                stop = Some((
                    seg,
                    cursor as u32,
                    format!(
                        "record LSN {} (segment seq {}), expected LSN {expected} in seq {seg_seq}",
                        rec.lsn, rec.segment_seq
                    ),
                    false,
                ));
                max_lsn_seen = max_lsn_seen.max(rec.lsn);
                if chain
                    .get(ci + 1)
                    .is_some_and(|&(s, _, _)| headers[s as usize].is_some_and(|hh| hh.first_lsn == expected))
                {
                    stop = None;
                    continue 'chain;
                }
                scan_rest(&buf, cursor + 1, seg_seq, sb.store_id, &mut max_durable, &mut max_lsn_seen);
                break 'chain;
            }
            let hb = rec.header_blocks() as usize;
            let db = rec.data_blocks() as usize;
            if cursor + hb + db > sb.segment_blocks as usize {
                stop = Some((seg, cursor as u32, "record runs past the end of its segment".into(), true));
                scan_rest(&buf, cursor + 1, seg_seq, sb.store_id, &mut max_durable, &mut max_lsn_seen);
                break 'chain;
            }
            let data_at = cursor + hb;
            let bad = (0..db).find(|i| {
                block_crc(&buf[(data_at + i) * BLOCK_BYTES..(data_at + i + 1) * BLOCK_BYTES]) != rec.crcs[*i]
            });
            if let Some(i) = bad {
                stop = Some((
                    seg,
                    (data_at + i) as u32,
                    format!("data block {i} of LSN {} fails its checksum", rec.lsn),
                    true,
                ));
                max_lsn_seen = max_lsn_seen.max(rec.lsn);
                max_durable = max_durable.max(rec.durable_lsn);
                scan_rest(&buf, cursor + 1, seg_seq, sb.store_id, &mut max_durable, &mut max_lsn_seen);
                break 'chain;
            }
            // Apply, exactly as the live engine did.
            let first_data_phys = seg * sb.segment_blocks + data_at as u32;
            match rec.kind {
                RecordKind::Data => state.apply_data(&rec.entries, &rec.crcs, first_data_phys, |_| {}),
                RecordKind::Meta => match MetaOp::decode(&rec.meta) {
                    Ok(op) => state.apply_meta(&op, |_| {}),
                    Err(e) => {
                        return Err(Error::CorruptRecord {
                            segment: SegmentId(seg),
                            lsn: rec.lsn,
                            what: format!("volume record: {e}"),
                        })
                    }
                },
            }
            report.records_replayed += 1;
            max_durable = max_durable.max(rec.durable_lsn);
            max_lsn_seen = max_lsn_seen.max(rec.lsn);
            let st = &mut segs[seg as usize];
            st.used_blocks = (cursor + hb + db) as u32;
            st.max_lsn = rec.lsn.0;
            st.note_trims(&rec.entries);
            for e in rec.entries.iter().filter(|e| e.kind.has_data()) {
                st.min_data_lsn = if st.min_data_lsn == 0 { e.data_lsn.0 } else { st.min_data_lsn.min(e.data_lsn.0) };
                st.max_data_lsn = st.max_data_lsn.max(e.data_lsn.0);
            }
            expected = expected.next();
            cursor += hb + db;
        }
    }
    report.last_lsn = Lsn(expected.0 - 1);
    // A resync that never committed: its staged blocks are dropped, and the volume is the consistent
    // image it was before the resync (one that overflowed staging stays inconsistent until a resync
    // commits).
    let staging: Vec<VolumeId> =
        state.volumes.values().filter(|v| !v.staged.is_empty() && !v.staged.overflowed).map(|v| v.id).collect();
    for v in staging {
        let n = state.volumes[&v].staged.writes.len();
        tracing::warn!("volume {v}: discarding an uncommitted resync ({n} staged blocks)");
        state.discard_staged(v, |_| {});
    }

    // Records beyond the end of the log: their durable_lsn tells whether the end was a torn tail
    // (nothing after it was ever acknowledged as durable) or corruption of durable data.
    let mut discarded = 0u32;
    for &(seg, seq, _) in chain.iter().skip(replayed_segments) {
        let _ = seq;
        discarded += 1;
        if let Some((d, l)) = scan_durable(device, &sb, seg)? {
            max_durable = max_durable.max(d);
            max_lsn_seen = max_lsn_seen.max(l);
        }
    }
    for (&s_seq, &seg) in by_seq.range(seq..) {
        let _ = s_seq;
        discarded += 1;
        if let Some((d, l)) = scan_durable(device, &sb, seg)? {
            max_durable = max_durable.max(d);
            max_lsn_seen = max_lsn_seen.max(l);
        }
    }
    if stop.is_none() && max_durable >= expected {
        return Err(Error::CorruptRecord {
            segment: SegmentId(chain.last().map_or(u32::MAX, |c| c.0)),
            lsn: expected,
            what: format!(
                "the log ends after segment seq {} but later records show LSN {max_durable} was durable: the segment holding LSN {expected} is missing or damaged",
                seq.saturating_sub(1)
            ),
        });
    }
    if let Some((seg, block, why, torn)) = &stop {
        if max_durable >= expected {
            return Err(Error::CorruptRecord {
                segment: SegmentId(*seg),
                lsn: expected,
                what: format!(
                    "{why} at block {block}, but later records show LSN {max_durable} was durable: acknowledged data is damaged"
                ),
            });
        }
        report.log_end = format!("segment {seg} block {block}: {why}");
        if *torn {
            tracing::warn!(
                "recovery discarded a torn tail at segment {seg} block {block}: {why} (never acknowledged as durable)"
            );
            report.discarded_torn = Some(report.log_end.clone());
        }
    } else {
        report.log_end = "end of the last segment".into();
    }
    if discarded > 0 {
        tracing::warn!(
            "recovery discarded {discarded} segment(s) written after the log's end (never acknowledged as durable)"
        );
    }
    report.discarded_segments = discarded;

    // Segments not in the replayed part of the chain but written after the checkpoint hold nothing
    // live; everything with no live block becomes free once the recovery checkpoint is durable.
    let replayed: Vec<u32> = chain.iter().take(replayed_segments).map(|c| c.0).collect();
    for (i, st) in segs.iter_mut().enumerate() {
        let in_chain = replayed.contains(&(i as u32));
        if state.live[i] == 0 {
            *st = SegState::from_rec(&SegmentRec {
                seq: 0,
                used_blocks: 0,
                min_data_lsn: 0,
                max_data_lsn: 0,
                max_lsn: 0,
                trim_tags: vec![],
            });
        } else if !in_chain && st.used_blocks == 0 {
            return Err(Error::CorruptStore(format!("segment {i} holds live blocks but is recorded as empty")));
        } else {
            st.status = SegStatus::Sealed;
        }
    }
    let next_lsn = Lsn(expected.0.max(max_lsn_seen.0.saturating_add(1)));
    let next_seg_seq = h.next_segment_seq.max(max_seq_seen.saturating_add(1));
    // Where the log ends is normal (unwritten space, or an older lap's records); a torn tail or
    // discarded segments were warned about above, so the reason is detail for debugging.
    tracing::info!(
        "opened store {:016x}: checkpoint {}, {} records replayed, log ends at LSN {}",
        sb.store_id,
        h.seq,
        report.records_replayed,
        report.last_lsn,
    );
    tracing::debug!("the log ends at {}", report.log_end);
    let core = Core::new(sb, cfg, state, segs, next_lsn, next_seg_seq, h.seq);
    Ok((core, report))
}

/// Highest durable_lsn and LSN among the valid records of a segment outside the replayed log.
fn scan_durable(device: &mut dyn Device, sb: &Superblock, seg: u32) -> Result<Option<(Lsn, Lsn)>> {
    let buf = read_blocking(device, sb.segment_offset(seg), sb.segment_blocks as usize)
        .map_err(|e| Error::io(format!("reading segment {seg} during recovery"), e))?;
    let Ok(sh) = SegmentHeader::decode(buf.block(0), sb.store_id) else { return Ok(None) };
    let mut cursor = 1usize;
    let mut best: Option<(Lsn, Lsn)> = None;
    while cursor < sb.segment_blocks as usize {
        let Ok(rec) = RecordHeader::decode(&buf[cursor * BLOCK_BYTES..], sb.store_id) else { break };
        if rec.segment_seq != sh.seq {
            break;
        }
        let (d, l) = best.unwrap_or((Lsn(0), Lsn(0)));
        best = Some((d.max(rec.durable_lsn), l.max(rec.lsn)));
        cursor += rec.header_blocks() as usize + rec.data_blocks() as usize;
    }
    Ok(best)
}

/// After the log's end inside a segment, looks at every later block for a valid record of the same
/// segment generation: its durable LSN tells whether the end was a torn tail or damage to records
/// that had been acknowledged as durable.
fn scan_rest(buf: &[u8], from: usize, seg_seq: u64, store_id: u64, max_durable: &mut Lsn, max_lsn: &mut Lsn) {
    for block in from..buf.len() / BLOCK_BYTES {
        if let Ok(rec) = RecordHeader::decode(&buf[block * BLOCK_BYTES..], store_id) {
            if rec.segment_seq == seg_seq {
                *max_durable = (*max_durable).max(rec.durable_lsn);
                *max_lsn = (*max_lsn).max(rec.lsn);
            }
        }
    }
}
