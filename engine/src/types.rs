//! Newtypes for the quantities that are easy to mix up, and the layout constants they rest on.

use std::fmt;

/// The block size of every store: the unit of allocation, checksumming and atomicity.
pub const BLOCK_BYTES: usize = 4096;
const _: () = assert!(BLOCK_BYTES % 512 == 0 && BLOCK_BYTES.is_power_of_two());
/// [`BLOCK_BYTES`] as a `u64`, the type of every byte offset and length in a volume.
pub const BLOCK_BYTES_U64: u64 = BLOCK_BYTES as u64;

/// Log sequence number: one per record, strictly increasing in log order, never reused.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

/// Logical block address within a volume, in [`BLOCK_BYTES`] units.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lba(pub u64);

/// A volume's permanent id; never reused within a store.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct VolumeId(pub u32);

/// Index of a segment in the data area.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SegmentId(pub u32);

/// A replication epoch: one per primary's term, strictly increasing across failovers. Zero means
/// the volume has never had a primary. Ordered, so a newer epoch compares greater.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Epoch(pub u64);

macro_rules! debug_display {
    ($($t:ident => $prefix:literal),*) => {$(
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    )*};
}
debug_display!(Lsn => "lsn:", Lba => "lba:", VolumeId => "vol:", SegmentId => "seg:", Epoch => "epoch:");

impl Lsn {
    pub fn next(self) -> Lsn {
        Lsn(self.0 + 1)
    }
}

impl Epoch {
    /// The epoch after this one: the next primary's.
    pub fn next(self) -> Epoch {
        Epoch(self.0 + 1)
    }
}

impl Lba {
    /// The byte offset of this block in its volume.
    pub fn offset_bytes(self) -> u64 {
        self.0 * BLOCK_BYTES_U64
    }
}

/// `n_blocks` consecutive blocks from `lba`. Not to be confused with a [`ByteRange`]: a run counts
/// blocks, a range bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockRun {
    pub lba: Lba,
    pub n_blocks: u64,
}

impl BlockRun {
    /// The first block after the run.
    pub fn end(self) -> Lba {
        Lba(self.lba.0 + self.n_blocks)
    }

    /// The bytes the run covers.
    pub fn bytes(self) -> ByteRange {
        ByteRange { offset: self.lba.offset_bytes(), len: self.n_blocks * BLOCK_BYTES_U64 }
    }
}

/// `len` bytes from byte `offset` of a volume: what NBD requests, replication frames and checksum
/// windows address. See [`BlockRun`] for runs of blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteRange {
    pub offset: u64,
    pub len: u64,
}

impl ByteRange {
    /// The first byte after the range.
    pub fn end(self) -> u64 {
        self.offset + self.len
    }
}

/// How a write or trim is tagged for replication: `seq` is its position in the volume's replicated
/// history (0 = untagged, for volumes that are not replicated). A `resync` write carries data a
/// resync ships: it is found by later scans like any tagged write, but does not move the volume's
/// last tag, which only the resync's commit sets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tag {
    pub seq: u64,
    pub resync: bool,
}

impl Tag {
    pub const NONE: Tag = Tag { seq: 0, resync: false };

    pub fn seq(seq: u64) -> Tag {
        Tag { seq, resync: false }
    }

    pub fn resync(seq: u64) -> Tag {
        Tag { seq, resync: true }
    }
}
