//! syncblock's storage engine: a crash-safe, log-structured block store on io_uring.
//!
//! See `ARCHITECTURE.md` for the bird's-eye view and `docs/format.md` for the on-disk format and the
//! crash cases. The public surface is [`Store`]; everything below it is reachable for tests.

pub mod buf;
pub mod device;
pub mod error;
mod lock;
pub mod types;
pub mod uring;

pub use error::{Error, ErrorClass, Result};
pub use types::{BlockRun, ByteRange, Epoch, Lba, Lsn, SegmentId, Tag, VolumeId, BLOCK_BYTES, BLOCK_BYTES_U64};
pub mod checkpoint;
pub mod core;
pub mod format;
pub mod index;
pub mod predict;
pub mod recovery;
mod segment_image;
pub mod sim;
pub mod state;
pub mod store;

pub use crate::core::{
    BlockPlace, ChangedRun, Config, Driver, Extent, Since, Stats, Written, CRC_BLOCKS_MAX, IO_BYTES_MAX,
    PLACES_BLOCKS_MAX, SCATTERED_BLOCKS_MAX,
};
pub use format::StagedOp;
pub use predict::CommitLoop;
pub use recovery::{min_store_bytes, RecoveryReport, DEFAULT_SEGMENT_BYTES, SEGMENT_BYTES_MIN, STORE_BYTES_MAX};
pub use state::{VolumeInfo, KEEP_LAST_TAG};
pub use store::{CreateOptions, Pending, Store};
