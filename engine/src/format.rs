//! Byte-level encoding of everything the engine puts on disk: superblock, segment headers, record
//! headers and checkpoint slot headers. `docs/format.md` draws these layouts; keep the two in step.
//!
//! All integers are little-endian. Every structure carries a magic, a format version, the store id
//! and a CRC32 (crc32fast) so that a torn write, a stale structure from an earlier store on the same
//! device, or garbage is rejected rather than trusted. Decoders never panic on any input.

use crate::types::{Lba, Lsn, VolumeId, BLOCK_BYTES};

/// On-disk format version written by this build.
pub const FORMAT_VERSION: u32 = 2;
pub const SUPERBLOCK_MAGIC: [u8; 8] = *b"SYNCBLK\0";
pub const SEGMENT_MAGIC: u32 = u32::from_le_bytes(*b"SBSG");
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"SBRC");
pub const CHECKPOINT_MAGIC: u32 = u32::from_le_bytes(*b"SBCK");

/// Bytes of fixed record-header fields before the entry table.
pub const RECORD_FIXED_BYTES: usize = 64;
/// Bytes per entry in a record header.
pub const ENTRY_BYTES: usize = 40;
/// Upper bound on a record header's size. A batch is at most [`BATCH_BLOCKS_MAX`] data blocks, each
/// possibly its own entry, plus up to as many trim entries: 64 + 256 × (40 + 4) + 256 × 40 bytes (21,568)
/// fit in 6 blocks; 8 leaves room for metadata.
pub const HEADER_BLOCKS_MAX: u32 = 8;
/// Largest batch (group commit) in data blocks: 1 MiB. Large enough that sequential bandwidth is
/// reached on SSDs and virtio disks, small enough that a batch's latency stays well under a
/// millisecond and the header stays a few blocks.
pub const BATCH_BLOCKS_MAX: u32 = 256;
/// Longest volume name.
pub const NAME_BYTES_MAX: usize = 64;

const _: () = assert!(
    RECORD_FIXED_BYTES + BATCH_BLOCKS_MAX as usize * (ENTRY_BYTES + 4) + 256
        <= HEADER_BLOCKS_MAX as usize * BLOCK_BYTES
);

/// Why a structure was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    BadMagic,
    BadVersion(u32),
    BadChecksum { expected: u32, got: u32 },
    WrongStore { expected: u64, got: u64 },
    Truncated { need: usize, have: usize },
    Invalid(&'static str),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::BadMagic => write!(f, "bad magic"),
            DecodeError::BadVersion(v) => write!(f, "unsupported format version {v}"),
            DecodeError::BadChecksum { expected, got } => {
                write!(f, "checksum mismatch (stored {expected:#010x}, computed {got:#010x})")
            }
            DecodeError::WrongStore { expected, got } => {
                write!(f, "belongs to store {got:016x}, not {expected:016x}")
            }
            DecodeError::Truncated { need, have } => write!(f, "truncated: need {need} bytes, have {have}"),
            DecodeError::Invalid(why) => write!(f, "invalid: {why}"),
        }
    }
}

fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// CRC32 of `b` with the 4 bytes at `crc_at` treated as zero: how every structure's own checksum
/// field is computed. Public so that tools re-sealing structures (the fuzzers) use the same rule.
pub fn crc_skipping(b: &[u8], crc_at: usize) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&b[..crc_at]);
    h.update(&[0; 4]);
    h.update(&b[crc_at + 4..]);
    h.finalize()
}

/// The magic (u32 at byte 0) and format version (u16 at byte 4) that open the segment, record and
/// checkpoint headers.
fn check_magic_version(b: &[u8], magic: u32) -> Result<(), DecodeError> {
    if get_u32(b, 0) != magic {
        return Err(DecodeError::BadMagic);
    }
    let version = get_u16(b, 4) as u32;
    if version != FORMAT_VERSION {
        return Err(DecodeError::BadVersion(version));
    }
    Ok(())
}

/// The CRC32 stored at `crc_at` against the one computed over `covered` with that field skipped.
fn check_crc(covered: &[u8], crc_at: usize) -> Result<(), DecodeError> {
    let expected = get_u32(covered, crc_at);
    let got = crc_skipping(covered, crc_at);
    if expected != got {
        return Err(DecodeError::BadChecksum { expected, got });
    }
    Ok(())
}

/// The store id at byte 8 names `store_id`.
fn check_store(b: &[u8], store_id: u64) -> Result<(), DecodeError> {
    let got = get_u64(b, 8);
    if got != store_id {
        return Err(DecodeError::WrongStore { expected: store_id, got });
    }
    Ok(())
}

fn check_len(b: &[u8], need: usize) -> Result<(), DecodeError> {
    if b.len() < need {
        return Err(DecodeError::Truncated { need, have: b.len() });
    }
    Ok(())
}

/// CRC of one data block, as stored in record headers and the index.
pub fn block_crc(block: &[u8]) -> u32 {
    crc32fast::hash(block)
}

// ---------------------------------------------------------------------------------------------
// Superblock

/// Where everything lives on the device. Written twice (blocks 0 and 1) at format time and never
/// rewritten, so no torn write can ever damage both copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    pub store_id: u64,
    pub device_bytes: u64,
    pub segment_blocks: u32,
    pub n_segments: u32,
    pub checkpoint_slot_blocks: u64,
    /// Byte offsets of the two checkpoint slots.
    pub checkpoint_offsets: [u64; 2],
    /// Byte offset of segment 0.
    pub data_offset: u64,
}

const SB_CRC_AT: usize = 72;

impl Superblock {
    pub fn encode(&self) -> [u8; BLOCK_BYTES] {
        let mut b = [0u8; BLOCK_BYTES];
        b[0..8].copy_from_slice(&SUPERBLOCK_MAGIC);
        put_u32(&mut b, 8, FORMAT_VERSION);
        put_u32(&mut b, 12, BLOCK_BYTES as u32);
        put_u64(&mut b, 16, self.store_id);
        put_u64(&mut b, 24, self.device_bytes);
        put_u32(&mut b, 32, self.segment_blocks);
        put_u32(&mut b, 36, self.n_segments);
        put_u64(&mut b, 40, self.checkpoint_slot_blocks);
        put_u64(&mut b, 48, self.checkpoint_offsets[0]);
        put_u64(&mut b, 56, self.checkpoint_offsets[1]);
        put_u64(&mut b, 64, self.data_offset);
        let crc = crc_skipping(&b[..SB_CRC_AT + 4], SB_CRC_AT);
        put_u32(&mut b, SB_CRC_AT, crc);
        b
    }

    pub fn decode(b: &[u8]) -> Result<Superblock, DecodeError> {
        check_len(b, SB_CRC_AT + 4)?;
        if b[0..8] != SUPERBLOCK_MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let version = get_u32(b, 8);
        if version != FORMAT_VERSION {
            return Err(DecodeError::BadVersion(version));
        }
        check_crc(&b[..SB_CRC_AT + 4], SB_CRC_AT)?;
        if get_u32(b, 12) as usize != BLOCK_BYTES {
            return Err(DecodeError::Invalid("block size"));
        }
        let sb = Superblock {
            store_id: get_u64(b, 16),
            device_bytes: get_u64(b, 24),
            segment_blocks: get_u32(b, 32),
            n_segments: get_u32(b, 36),
            checkpoint_slot_blocks: get_u64(b, 40),
            checkpoint_offsets: [get_u64(b, 48), get_u64(b, 56)],
            data_offset: get_u64(b, 64),
        };
        sb.validate()?;
        Ok(sb)
    }

    /// Geometry checks, so that a decoded superblock can be used for offset arithmetic safely.
    fn validate(&self) -> Result<(), DecodeError> {
        let bb = BLOCK_BYTES as u64;
        let seg_bytes = self.segment_blocks as u64 * bb;
        if self.segment_blocks < 16 || self.n_segments == 0 {
            return Err(DecodeError::Invalid("segment geometry"));
        }
        let end = (self.n_segments as u64).checked_mul(seg_bytes).and_then(|d| d.checked_add(self.data_offset));
        let slot_bytes = self.checkpoint_slot_blocks.checked_mul(bb);
        match (end, slot_bytes) {
            (Some(end), Some(slot))
                if end <= self.device_bytes
                    && self.data_offset % bb == 0
                    && self
                        .checkpoint_offsets
                        .iter()
                        .all(|o| o % bb == 0 && o.saturating_add(slot) <= self.data_offset && *o >= 2 * bb) =>
            {
                Ok(())
            }
            _ => Err(DecodeError::Invalid("layout outside device")),
        }
    }

    pub fn segment_offset(&self, segment: u32) -> u64 {
        self.data_offset + segment as u64 * self.segment_blocks as u64 * BLOCK_BYTES as u64
    }
}

// ---------------------------------------------------------------------------------------------
// Segment header

/// Block 0 of every segment, written with the segment's first record. `seq` orders segments in the
/// log; it is assigned when the segment is opened and never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub store_id: u64,
    pub seq: u64,
    pub segment: u32,
    pub first_lsn: Lsn,
}

const SEG_CRC_AT: usize = 40;

impl SegmentHeader {
    pub fn encode_into(&self, b: &mut [u8]) {
        b[..BLOCK_BYTES].fill(0);
        put_u32(b, 0, SEGMENT_MAGIC);
        put_u16(b, 4, FORMAT_VERSION as u16);
        put_u64(b, 8, self.store_id);
        put_u64(b, 16, self.seq);
        put_u32(b, 24, self.segment);
        put_u64(b, 32, self.first_lsn.0);
        let crc = crc_skipping(&b[..SEG_CRC_AT + 4], SEG_CRC_AT);
        put_u32(b, SEG_CRC_AT, crc);
    }

    pub fn decode(b: &[u8], store_id: u64) -> Result<SegmentHeader, DecodeError> {
        check_len(b, SEG_CRC_AT + 4)?;
        check_magic_version(b, SEGMENT_MAGIC)?;
        check_crc(&b[..SEG_CRC_AT + 4], SEG_CRC_AT)?;
        check_store(b, store_id)?;
        Ok(SegmentHeader { store_id, seq: get_u64(b, 16), segment: get_u32(b, 24), first_lsn: Lsn(get_u64(b, 32)) })
    }
}

// ---------------------------------------------------------------------------------------------
// Records

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// Writes, trims and GC copies.
    Data = 1,
    /// A volume-table change (create, resize, delete).
    Meta = 2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// `n_blocks` data blocks written by a client, at LSN `data_lsn` (= the record's LSN).
    Write = 1,
    /// `n_blocks` unmapped (trim, or zeroing that may leave a hole). No data blocks.
    Trim = 2,
    /// Blocks copied forward by the cleaner; `data_lsn` is the LSN of the write that produced them,
    /// so that replay never lets a copy override a newer write.
    Copy = 3,
}

impl EntryKind {
    pub fn has_data(self) -> bool {
        matches!(self, EntryKind::Write | EntryKind::Copy)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub volume: VolumeId,
    pub kind: EntryKind,
    pub lba: Lba,
    pub n_blocks: u32,
    pub data_lsn: Lsn,
    /// For [`EntryKind::Copy`]: the physical block the data was copied from (the run's first), so
    /// that replay makes exactly the decision the live engine made: the copy takes effect only if the
    /// block still lived there. Zero for other kinds.
    pub old_phys: u32,
    /// Replication sequence number ("tag") of the write or trim that produced this entry, kept by
    /// cleaner copies; 0 when the volume is not replicated. Resync scans find changes by it.
    pub tag: u64,
    /// Written by a resync: the data counts, but the volume's last tag moves only when the resync
    /// commits (see [`MetaOp::SetRepl`]).
    pub resync: bool,
}

/// Entry flag bit: [`Entry::resync`].
const ENTRY_FLAG_RESYNC: u8 = 1;

/// The header block(s) of a record; data blocks follow it directly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: RecordKind,
    pub lsn: Lsn,
    /// Highest LSN known durable (synced) when this record was built: recovery uses it to tell a
    /// torn tail (records after it) from corruption of acknowledged data (records at or before it).
    pub durable_lsn: Lsn,
    pub segment_seq: u64,
    pub entries: Vec<Entry>,
    /// CRC of each data block, in order.
    pub crcs: Vec<u32>,
    /// Payload of a Meta record.
    pub meta: Vec<u8>,
}

const REC_CRC_AT: usize = 56;

/// Header blocks needed for a record with these contents.
pub fn header_blocks_for(n_entries: usize, n_data_blocks: usize, meta_bytes: usize) -> u32 {
    let bytes = RECORD_FIXED_BYTES + n_entries * ENTRY_BYTES + n_data_blocks * 4 + meta_bytes;
    bytes.div_ceil(BLOCK_BYTES) as u32
}

impl RecordHeader {
    pub fn header_blocks(&self) -> u32 {
        header_blocks_for(self.entries.len(), self.crcs.len(), self.meta.len())
    }

    pub fn data_blocks(&self) -> u32 {
        self.crcs.len() as u32
    }

    /// Writes the header into `b`, which must hold `header_blocks()` blocks.
    pub fn encode_into(&self, b: &mut [u8], store_id: u64) {
        let header_blocks = self.header_blocks();
        let len = header_blocks as usize * BLOCK_BYTES;
        debug_assert!(header_blocks <= HEADER_BLOCKS_MAX);
        debug_assert_eq!(
            self.entries.iter().filter(|e| e.kind.has_data()).map(|e| e.n_blocks as usize).sum::<usize>(),
            self.crcs.len()
        );
        let b = &mut b[..len];
        b.fill(0);
        put_u32(b, 0, RECORD_MAGIC);
        put_u16(b, 4, FORMAT_VERSION as u16);
        put_u16(b, 6, self.kind as u16);
        put_u64(b, 8, self.lsn.0);
        put_u64(b, 16, self.durable_lsn.0);
        put_u64(b, 24, self.segment_seq);
        put_u32(b, 32, header_blocks);
        put_u32(b, 36, self.crcs.len() as u32);
        put_u32(b, 40, self.entries.len() as u32);
        put_u32(b, 44, self.meta.len() as u32);
        put_u64(b, 48, store_id);
        let mut at = RECORD_FIXED_BYTES;
        for e in &self.entries {
            put_u32(b, at, e.volume.0);
            b[at + 4] = e.kind as u8;
            b[at + 5] = if e.resync { ENTRY_FLAG_RESYNC } else { 0 };
            put_u32(b, at + 8, e.n_blocks);
            put_u32(b, at + 12, e.old_phys);
            put_u64(b, at + 16, e.lba.0);
            put_u64(b, at + 24, e.data_lsn.0);
            put_u64(b, at + 32, e.tag);
            at += ENTRY_BYTES;
        }
        for crc in &self.crcs {
            put_u32(b, at, *crc);
            at += 4;
        }
        b[at..at + self.meta.len()].copy_from_slice(&self.meta);
        let crc = crc_skipping(b, REC_CRC_AT);
        put_u32(b, REC_CRC_AT, crc);
    }

    /// Decodes a header from the start of `b`. `b` may be longer than the header.
    pub fn decode(b: &[u8], store_id: u64) -> Result<RecordHeader, DecodeError> {
        check_len(b, BLOCK_BYTES)?;
        check_magic_version(b, RECORD_MAGIC)?;
        let header_blocks = get_u32(b, 32);
        if header_blocks == 0 || header_blocks > HEADER_BLOCKS_MAX {
            return Err(DecodeError::Invalid("header block count"));
        }
        let len = header_blocks as usize * BLOCK_BYTES;
        check_len(b, len)?;
        let b = &b[..len];
        check_crc(b, REC_CRC_AT)?;
        let got_store = get_u64(b, 48);
        if got_store != store_id {
            return Err(DecodeError::WrongStore { expected: store_id, got: got_store });
        }
        let kind = match get_u16(b, 6) {
            1 => RecordKind::Data,
            2 => RecordKind::Meta,
            _ => return Err(DecodeError::Invalid("record kind")),
        };
        let data_blocks = get_u32(b, 36) as usize;
        let n_entries = get_u32(b, 40) as usize;
        let meta_bytes = get_u32(b, 44) as usize;
        // Bound each count before multiplying so the size check cannot overflow.
        if n_entries > len || data_blocks > len || meta_bytes > len {
            return Err(DecodeError::Invalid("counts exceed header"));
        }
        if header_blocks_for(n_entries, data_blocks, meta_bytes) != header_blocks {
            return Err(DecodeError::Invalid("header size does not match its contents"));
        }
        let mut entries = Vec::with_capacity(n_entries);
        let mut at = RECORD_FIXED_BYTES;
        let mut data_sum: u64 = 0;
        for _ in 0..n_entries {
            let kind = match b[at + 4] {
                1 => EntryKind::Write,
                2 => EntryKind::Trim,
                3 => EntryKind::Copy,
                _ => return Err(DecodeError::Invalid("entry kind")),
            };
            let e = Entry {
                volume: VolumeId(get_u32(b, at)),
                kind,
                n_blocks: get_u32(b, at + 8),
                lba: Lba(get_u64(b, at + 16)),
                data_lsn: Lsn(get_u64(b, at + 24)),
                old_phys: get_u32(b, at + 12),
                tag: get_u64(b, at + 32),
                resync: b[at + 5] & ENTRY_FLAG_RESYNC != 0,
            };
            if b[at + 5] & !ENTRY_FLAG_RESYNC != 0 || b[at + 6] != 0 || b[at + 7] != 0 {
                return Err(DecodeError::Invalid("entry flags"));
            }
            if e.n_blocks == 0 || e.lba.0.checked_add(e.n_blocks as u64).is_none() {
                return Err(DecodeError::Invalid("entry range"));
            }
            if kind.has_data() {
                data_sum += e.n_blocks as u64;
            }
            entries.push(e);
            at += ENTRY_BYTES;
        }
        if data_sum != data_blocks as u64 {
            return Err(DecodeError::Invalid("entries do not account for the data blocks"));
        }
        let crcs = (0..data_blocks).map(|i| get_u32(b, at + 4 * i)).collect();
        at += 4 * data_blocks;
        let meta = b[at..at + meta_bytes].to_vec();
        Ok(RecordHeader {
            kind,
            lsn: Lsn(get_u64(b, 8)),
            durable_lsn: Lsn(get_u64(b, 16)),
            segment_seq: get_u64(b, 24),
            entries,
            crcs,
            meta,
        })
    }
}

/// Longest replication attribute blob ([`MetaOp::SetRepl`]): the replicator's per-volume state
/// (epoch history, role, peer identity) fits in a few hundred bytes; the cap keeps every checkpoint's
/// volume table small and a meta record within one header block.
pub const ATTR_BYTES_MAX: usize = 512;
/// Volumes of one store that may carry a replication blob at once, at the least: checkpoint slots are
/// sized for the worst case (every such volume a full blob and its most staged trims, about 2.6 KiB),
/// so a store budgets one replicated volume per [`ATTR_DATA_BYTES_PER_VOLUME`] of its data area, and
/// never fewer than 64 (what every store had before cluster mode; a small store pays ~170 KiB per
/// slot for them) nor more than [`crate::state::VOLUMES_MAX`]. A cluster node holds a replica of
/// many volumes (a 40 GiB store: 2,560). The limit of an open store is what its slots hold
/// ([`crate::checkpoint::attr_volumes_fitting`]), so stores formatted before keep their 64.
pub const ATTR_VOLUMES_MIN: usize = 64;

/// Data area per replicated volume budgeted at format time: 16 MiB, so the replication state's share
/// of a checkpoint slot stays under 0.02 % of the data area.
pub const ATTR_DATA_BYTES_PER_VOLUME: u64 = 16 << 20;

/// A volume-table change, the payload of a Meta record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaOp {
    Create {
        volume: VolumeId,
        size_bytes: u64,
        name: String,
    },
    Resize {
        volume: VolumeId,
        size_bytes: u64,
    },
    Delete {
        volume: VolumeId,
    },
    /// Replication state of a volume, set by the replicator: its last applied tag (a resync commit
    /// moves it; a rollback lowers it), the trim-retention floor (trim entries with a higher tag keep
    /// their segments from being reused, so a later resync still finds them) and an opaque blob.
    SetRepl {
        volume: VolumeId,
        last_tag: u64,
        trim_floor: u64,
        attr: Vec<u8>,
        staged: StagedOp,
    },
}

/// What a [`MetaOp::SetRepl`] does with the volume's staged resync (see `state::Staged`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StagedOp {
    #[default]
    Keep,
    /// The resync is complete: apply everything it staged, at once.
    Commit,
    /// Drop what an unfinished resync staged.
    Discard,
}

impl MetaOp {
    pub fn encode(&self) -> Vec<u8> {
        let (op, volume, size, payload): (u8, VolumeId, u64, Vec<u8>) = match self {
            MetaOp::Create { volume, size_bytes, name } => (1u8, *volume, *size_bytes, name.as_bytes().to_vec()),
            MetaOp::Resize { volume, size_bytes } => (2, *volume, *size_bytes, Vec::new()),
            MetaOp::Delete { volume } => (3, *volume, 0, Vec::new()),
            MetaOp::SetRepl { volume, last_tag, trim_floor, attr, staged } => {
                let mut p = trim_floor.to_le_bytes().to_vec();
                p.extend_from_slice(attr);
                let op = match staged {
                    StagedOp::Keep => 4,
                    StagedOp::Commit => 5,
                    StagedOp::Discard => 6,
                };
                (op, *volume, *last_tag, p)
            }
        };
        let mut b = vec![0u8; 16 + payload.len()];
        b[0] = op;
        put_u16(&mut b, 2, payload.len() as u16);
        put_u32(&mut b, 4, volume.0);
        put_u64(&mut b, 8, size);
        b[16..].copy_from_slice(&payload);
        b
    }

    pub fn decode(b: &[u8]) -> Result<MetaOp, DecodeError> {
        check_len(b, 16)?;
        let payload_len = get_u16(b, 2) as usize;
        if b.len() != 16 + payload_len {
            return Err(DecodeError::Invalid("meta payload length"));
        }
        let volume = VolumeId(get_u32(b, 4));
        let size_bytes = get_u64(b, 8);
        let payload = &b[16..];
        match b[0] {
            1 => {
                if payload_len > NAME_BYTES_MAX {
                    return Err(DecodeError::Invalid("meta name length"));
                }
                let name = std::str::from_utf8(payload).map_err(|_| DecodeError::Invalid("meta name utf-8"))?;
                Ok(MetaOp::Create { volume, size_bytes, name: name.to_string() })
            }
            2 if payload_len == 0 => Ok(MetaOp::Resize { volume, size_bytes }),
            3 if payload_len == 0 => Ok(MetaOp::Delete { volume }),
            op @ 4..=6 if payload_len >= 8 && payload_len - 8 <= ATTR_BYTES_MAX => Ok(MetaOp::SetRepl {
                volume,
                last_tag: size_bytes,
                trim_floor: get_u64(payload, 0),
                attr: payload[8..].to_vec(),
                staged: match op {
                    4 => StagedOp::Keep,
                    5 => StagedOp::Commit,
                    _ => StagedOp::Discard,
                },
            }),
            _ => Err(DecodeError::Invalid("meta op")),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Checkpoint slot header

/// Block 0 of a checkpoint slot; the rkyv payload follows from block 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointHeader {
    pub store_id: u64,
    /// Increases by one per checkpoint; the valid slot with the higher seq wins.
    pub seq: u64,
    /// Every record with LSN < `next_lsn` is reflected in the payload.
    pub next_lsn: Lsn,
    /// Segments with seq >= this hold the log written after the checkpoint.
    pub next_segment_seq: u64,
    /// Where the log head was when the checkpoint was taken: replay starts at block `tail_block`
    /// of segment `tail_segment` (whose seq is `tail_seq`), then follows segments with seq >=
    /// `next_segment_seq`. `tail_segment == u32::MAX` means no segment was open.
    pub tail_segment: u32,
    pub tail_block: u32,
    pub tail_seq: u64,
    pub payload_bytes: u64,
    pub payload_crc: u32,
}

const CK_CRC_AT: usize = 72;

impl CheckpointHeader {
    pub fn encode(&self) -> [u8; BLOCK_BYTES] {
        let mut b = [0u8; BLOCK_BYTES];
        put_u32(&mut b, 0, CHECKPOINT_MAGIC);
        put_u16(&mut b, 4, FORMAT_VERSION as u16);
        put_u64(&mut b, 8, self.store_id);
        put_u64(&mut b, 16, self.seq);
        put_u64(&mut b, 24, self.next_lsn.0);
        put_u64(&mut b, 32, self.next_segment_seq);
        put_u64(&mut b, 40, self.payload_bytes);
        put_u32(&mut b, 52, self.payload_crc);
        put_u32(&mut b, 56, self.tail_segment);
        put_u32(&mut b, 60, self.tail_block);
        put_u64(&mut b, 64, self.tail_seq);
        let crc = crc_skipping(&b[..CK_CRC_AT + 8], CK_CRC_AT);
        put_u32(&mut b, CK_CRC_AT, crc);
        b
    }

    pub fn decode(b: &[u8], store_id: u64) -> Result<CheckpointHeader, DecodeError> {
        check_len(b, CK_CRC_AT + 8)?;
        check_magic_version(b, CHECKPOINT_MAGIC)?;
        check_crc(&b[..CK_CRC_AT + 8], CK_CRC_AT)?;
        check_store(b, store_id)?;
        Ok(CheckpointHeader {
            store_id,
            seq: get_u64(b, 16),
            next_lsn: Lsn(get_u64(b, 24)),
            next_segment_seq: get_u64(b, 32),
            payload_bytes: get_u64(b, 40),
            payload_crc: get_u32(b, 52),
            tail_segment: get_u32(b, 56),
            tail_block: get_u32(b, 60),
            tail_seq: get_u64(b, 64),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_record() -> RecordHeader {
        RecordHeader {
            kind: RecordKind::Data,
            lsn: Lsn(42),
            durable_lsn: Lsn(40),
            segment_seq: 7,
            entries: vec![
                Entry {
                    volume: VolumeId(1),
                    kind: EntryKind::Write,
                    lba: Lba(10),
                    n_blocks: 2,
                    data_lsn: Lsn(42),
                    old_phys: 0,
                    tag: 17,
                    resync: false,
                },
                Entry {
                    volume: VolumeId(2),
                    kind: EntryKind::Trim,
                    lba: Lba(0),
                    n_blocks: 1 << 20,
                    data_lsn: Lsn(42),
                    old_phys: 0,
                    tag: 0,
                    resync: false,
                },
                Entry {
                    volume: VolumeId(1),
                    kind: EntryKind::Copy,
                    lba: Lba(99),
                    n_blocks: 1,
                    data_lsn: Lsn(3),
                    old_phys: 77,
                    tag: u64::MAX,
                    resync: true,
                },
            ],
            crcs: vec![1, 2, 3],
            meta: vec![],
        }
    }

    #[test]
    fn record_header_round_trips() {
        let rec = sample_record();
        let mut b = vec![0u8; rec.header_blocks() as usize * BLOCK_BYTES];
        rec.encode_into(&mut b, 9);
        assert_eq!(RecordHeader::decode(&b, 9).unwrap(), rec);
        assert!(matches!(RecordHeader::decode(&b, 8), Err(DecodeError::WrongStore { .. })));
    }

    #[test]
    fn record_header_rejects_every_single_bit_flip() {
        let rec = sample_record();
        let mut b = vec![0u8; BLOCK_BYTES];
        rec.encode_into(&mut b, 9);
        for bit in 0..(256 * 8) {
            let mut c = b.clone();
            c[bit / 8] ^= 1 << (bit % 8);
            assert!(RecordHeader::decode(&c, 9).is_err(), "bit {bit} flip accepted");
        }
    }

    #[test]
    fn largest_batch_header_fits_the_limit() {
        assert!(header_blocks_for(BATCH_BLOCKS_MAX as usize, BATCH_BLOCKS_MAX as usize, 0) <= 3);
    }

    #[test]
    fn superblock_and_segment_and_checkpoint_headers_round_trip() {
        let sb = Superblock {
            store_id: 5,
            device_bytes: 1 << 30,
            segment_blocks: 256,
            n_segments: 10,
            checkpoint_slot_blocks: 4,
            checkpoint_offsets: [8192, 8192 + 4 * 4096],
            data_offset: 8192 + 8 * 4096,
        };
        assert_eq!(Superblock::decode(&sb.encode()).unwrap(), sb);
        let mut torn = sb.encode();
        torn[30] ^= 1;
        assert!(Superblock::decode(&torn).is_err());

        let sh = SegmentHeader { store_id: 5, seq: 77, segment: 3, first_lsn: Lsn(1000) };
        let mut b = [0u8; BLOCK_BYTES];
        sh.encode_into(&mut b);
        assert_eq!(SegmentHeader::decode(&b, 5).unwrap(), sh);

        let ck = CheckpointHeader {
            store_id: 5,
            seq: 3,
            next_lsn: Lsn(9),
            next_segment_seq: 4,
            tail_segment: 2,
            tail_block: 17,
            tail_seq: 3,
            payload_bytes: 100,
            payload_crc: 0xdead,
        };
        assert_eq!(CheckpointHeader::decode(&ck.encode(), 5).unwrap(), ck);
    }

    #[test]
    fn meta_ops_round_trip() {
        for op in [
            MetaOp::Create { volume: VolumeId(3), size_bytes: 1 << 40, name: "db-01".into() },
            MetaOp::Resize { volume: VolumeId(3), size_bytes: 4096 },
            MetaOp::Delete { volume: VolumeId(3) },
            MetaOp::SetRepl {
                volume: VolumeId(3),
                last_tag: 9,
                trim_floor: 4,
                attr: b"epoch".to_vec(),
                staged: StagedOp::Keep,
            },
            MetaOp::SetRepl { volume: VolumeId(3), last_tag: 9, trim_floor: 4, attr: vec![], staged: StagedOp::Commit },
            MetaOp::SetRepl {
                volume: VolumeId(3),
                last_tag: 9,
                trim_floor: 4,
                attr: vec![],
                staged: StagedOp::Discard,
            },
        ] {
            assert_eq!(MetaOp::decode(&op.encode()).unwrap(), op);
        }
        assert!(MetaOp::decode(&[9; 16]).is_err());
    }
}
