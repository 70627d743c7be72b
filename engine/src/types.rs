//! Newtypes for the quantities that are easy to mix up, and the layout constants they rest on.

use std::fmt;

/// The block size of every store: the unit of allocation, checksumming and atomicity.
pub const BLOCK_BYTES: usize = 4096;
const _: () = assert!(BLOCK_BYTES % 512 == 0 && BLOCK_BYTES.is_power_of_two());

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
debug_display!(Lsn => "lsn:", Lba => "lba:", VolumeId => "vol:", SegmentId => "seg:");

impl Lsn {
    pub fn next(self) -> Lsn {
        Lsn(self.0 + 1)
    }
}
