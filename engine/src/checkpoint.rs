//! Checkpoints: the index, segment table and volume table persisted with rkyv, so recovery replays
//! only the log written since.
//!
//! A checkpoint occupies one of two fixed slots (chosen by `seq % 2`): block 0 is a
//! [`CheckpointHeader`](crate::format::CheckpointHeader) holding the payload's length and CRC, the
//! rkyv payload follows. The payload is validated twice: by CRC, then by rkyv's bytecheck and by our
//! own semantic checks (every location inside the data area, every run inside its volume) before any
//! of it is trusted.

use rkyv::{Archive, Deserialize, Serialize};

use crate::types::BLOCK_BYTES;

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct VolumeRec {
    pub id: u32,
    pub name: String,
    pub size_bytes: u64,
    pub last_tag: u64,
    pub trim_floor: u64,
    pub attr: Vec<u8>,
    /// An uncommitted resync's staged blocks (LBA, packed location) and trimmed ranges.
    pub staged: Vec<(u64, u64)>,
    pub staged_trims: Vec<(u64, u64)>,
    pub resync_overflowed: bool,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SegmentRec {
    /// Log order of the segment; 0 if it was never written.
    pub seq: u64,
    /// Blocks written in the segment (segment header, record headers and data).
    pub used_blocks: u32,
    pub min_data_lsn: u64,
    pub max_data_lsn: u64,
    pub max_lsn: u64,
    /// Per volume, the highest tag of a trim entry in the segment (see `MetaOp::SetRepl`).
    pub trim_tags: Vec<(u32, u64)>,
}

impl SegmentRec {
    /// A segment never written, or empty and free.
    pub fn empty() -> SegmentRec {
        SegmentRec { seq: 0, used_blocks: 0, min_data_lsn: 0, max_data_lsn: 0, max_lsn: 0, trim_tags: vec![] }
    }
}

/// A run of consecutive mapped LBAs in one volume; its packed entries are `entries[first..first+n]`
/// where `first` is the sum of the preceding runs' lengths.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq)]
pub struct RunRec {
    pub volume: u32,
    pub n_blocks: u32,
    pub lba: u64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct CheckpointData {
    pub next_volume_id: u32,
    pub volumes: Vec<VolumeRec>,
    pub segments: Vec<SegmentRec>,
    pub runs: Vec<RunRec>,
    pub entries: Vec<u64>,
}

/// Bytes a checkpoint payload may need for a store of this geometry, assuming every data block is
/// mapped by its own run (the worst case: 16 bytes of run + 8 of entry per block), plus the segment
/// and volume tables. Sizing the slots for the worst case means a checkpoint can always be written.
pub fn max_payload_bytes(n_segments: u64, data_blocks: u64, max_volumes: u64, attr_volumes: u64) -> u64 {
    base_payload_bytes(n_segments, data_blocks, max_volumes) + attr_volumes * ATTR_BUDGET_BYTES
}

/// What a replicated volume may add to a checkpoint: its blob and its most staged trimmed ranges
/// (staged blocks are data blocks, each mapped once, index or staged, so the per-block budget
/// covers them).
const ATTR_BUDGET_BYTES: u64 = (crate::format::ATTR_BYTES_MAX + 16 + 16 * crate::state::STAGED_TRIMS_MAX + 64) as u64;

fn base_payload_bytes(n_segments: u64, data_blocks: u64, max_volumes: u64) -> u64 {
    let per_block = 16 + 8;
    // A segment lists trim tags for at most a few volumes in practice; 8 is budgeted.
    let per_segment = 48 + 8 * 16;
    let per_volume = 64 + crate::format::NAME_BYTES_MAX as u64;
    4 * BLOCK_BYTES as u64 + data_blocks * per_block + n_segments * per_segment + max_volumes * per_volume
}

/// Replicated volumes budgeted when a store with this data area is formatted.
pub fn attr_volumes_for_format(data_blocks: u64) -> u64 {
    let per = crate::format::ATTR_DATA_BYTES_PER_VOLUME / BLOCK_BYTES as u64;
    (data_blocks / per).clamp(crate::format::ATTR_VOLUMES_MIN as u64, crate::state::VOLUMES_MAX as u64)
}

/// Replicated volumes a store's checkpoint slots hold in the worst case: the limit of an open store
/// (at least [`crate::format::ATTR_VOLUMES_MIN`], which every format budgeted).
pub fn attr_volumes_fitting(sb: &crate::format::Superblock) -> usize {
    let segment_blocks = u64::from(sb.segment_blocks);
    let n = u64::from(sb.n_segments);
    let base = base_payload_bytes(n, n * segment_blocks, crate::state::VOLUMES_MAX as u64);
    // A slot is a header block and the payload's blocks.
    let payload = sb.checkpoint_slot_blocks.saturating_sub(1) * BLOCK_BYTES as u64;
    let fit = payload.saturating_sub(base) / ATTR_BUDGET_BYTES;
    (fit as usize).clamp(crate::format::ATTR_VOLUMES_MIN, crate::state::VOLUMES_MAX)
}

impl CheckpointData {
    pub fn to_bytes(&self) -> Vec<u8> {
        rkyv::to_bytes::<rkyv::rancor::Error>(self).expect("serialising a checkpoint cannot fail").to_vec()
    }

    /// Validates and deserialises a payload. `bytes` must be 16-byte aligned (payloads are read into
    /// block-aligned buffers).
    pub fn from_bytes(bytes: &[u8]) -> Result<CheckpointData, String> {
        let archived = rkyv::access::<ArchivedCheckpointData, rkyv::rancor::Error>(bytes)
            .map_err(|e| format!("payload fails validation: {e}"))?;
        rkyv::deserialize::<CheckpointData, rkyv::rancor::Error>(archived).map_err(|e| format!("payload: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buf::AlignedBuf;

    /// A superblock with the slots a format budgeting `attrs` replicated volumes would give.
    fn geometry(n_segments: u32, segment_blocks: u32, attrs: u64) -> crate::format::Superblock {
        let data = u64::from(n_segments) * u64::from(segment_blocks);
        let payload = max_payload_bytes(u64::from(n_segments), data, crate::state::VOLUMES_MAX as u64, attrs);
        let slot = 1 + payload.div_ceil(BLOCK_BYTES as u64);
        crate::format::Superblock {
            store_id: 1,
            device_bytes: 0,
            segment_blocks,
            n_segments,
            checkpoint_slot_blocks: slot,
            checkpoint_offsets: [0, 0],
            data_offset: 0,
        }
    }

    #[test]
    fn a_store_allows_the_replicated_volumes_its_slots_hold_and_no_more() {
        // 8 MiB segments: 4 (the smallest store), 128 (1 GiB), 5,120 (40 GiB), 100,000 (800 GiB).
        for n in [4u32, 128, 5_120, 100_000] {
            let data = u64::from(n) * 2048;
            let budget = attr_volumes_for_format(data);
            let sb = geometry(n, 2048, budget);
            let fit = attr_volumes_fitting(&sb);
            assert!(fit as u64 >= budget, "{n} segments: budgeted {budget}, the slot holds {fit}");
            let worst = max_payload_bytes(u64::from(n), data, crate::state::VOLUMES_MAX as u64, fit as u64);
            assert!(worst <= (sb.checkpoint_slot_blocks - 1) * BLOCK_BYTES as u64, "{n} segments: {fit} overflow");
        }
        // Small stores keep the 64 of every earlier format; a 40 GiB store holds thousands.
        assert_eq!(attr_volumes_for_format(128 * 2048), crate::format::ATTR_VOLUMES_MIN as u64);
        assert_eq!(attr_volumes_fitting(&geometry(128, 2048, 64)), crate::format::ATTR_VOLUMES_MIN);
        assert!(attr_volumes_for_format(5_120 * 2048) >= 2_000);
        assert_eq!(attr_volumes_for_format(100_000 * 2048), crate::state::VOLUMES_MAX as u64);
    }

    #[test]
    fn checkpoint_round_trips_and_rejects_garbage() {
        let data = CheckpointData {
            next_volume_id: 3,
            volumes: vec![VolumeRec {
                id: 1,
                name: "a".into(),
                size_bytes: 1 << 30,
                last_tag: 5,
                trim_floor: 2,
                attr: vec![1, 2],
                staged: vec![(3, 9)],
                staged_trims: vec![(4, 8)],
                resync_overflowed: false,
            }],
            segments: vec![SegmentRec {
                seq: 1,
                used_blocks: 10,
                min_data_lsn: 1,
                max_data_lsn: 5,
                max_lsn: 5,
                trim_tags: vec![(1, 3)],
            }],
            runs: vec![RunRec { volume: 1, n_blocks: 2, lba: 7 }],
            entries: vec![1, 2],
        };
        let bytes = data.to_bytes();
        let mut buf = AlignedBuf::zeroed(bytes.len().div_ceil(BLOCK_BYTES));
        buf[..bytes.len()].copy_from_slice(&bytes);
        assert_eq!(CheckpointData::from_bytes(&buf[..bytes.len()]).unwrap(), data);
        let mut garbage = AlignedBuf::zeroed(1);
        garbage.fill(0xff);
        assert!(CheckpointData::from_bytes(&garbage[..bytes.len()]).is_err());
    }
}
