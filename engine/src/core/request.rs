//! What callers send the core and what it answers: requests, their replies' types, tunables and
//! counters. Everything here is public through [`crate::Store`]'s API.

use super::*;

/// Largest byte count of one read or write request: 32 MiB, the largest payload NBD clients send
/// and the figure NBD servers conventionally advertise as their maximum block size. It bounds the
/// memory one request can pin.
pub const IO_BYTES_MAX: u64 = 32 << 20;

pub type Reply<T> = oneshot::Sender<Result<T>>;

/// A byte range of a volume and whether it is mapped, for NBD block status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub range: ByteRange,
    /// False for unwritten or trimmed ranges, which read as zeros.
    pub mapped: bool,
}

/// Where a changed-block scan starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Since {
    /// Live blocks whose data was written by a record with a higher LSN.
    Lsn(Lsn),
    /// Blocks written or trimmed by entries with a higher replication tag, live or trimmed since:
    /// what a replica that has the history up to this tag lacks. Trims are found as long as the
    /// volume's trim floor is at or below `tag` (their segments are pinned until then).
    Tag(u64),
}

/// Blocks changed after a point (see [`Since`]): `n_blocks` consecutive LBAs from `lba`.
pub type ChangedRun = BlockRun;

/// Engine counters.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub next_lsn: Lsn,
    pub durable_lsn: Lsn,
    pub n_segments: u32,
    pub free_segments: u32,
    /// Segments the cleaner keeps free (its reserve and working room): what a store can hold of
    /// volume data is its log less these.
    pub reserved_segments: u32,
    pub segment_bytes: u64,
    pub live_blocks: u64,
    pub index_heap_bytes: u64,
    /// Data blocks clients wrote (including zero blocks written for NO_HOLE zeroing).
    pub user_blocks_written: u64,
    /// Blocks the cleaner copied forward.
    pub gc_blocks_copied: u64,
    /// Every block written to the log: data, record headers and segment headers.
    pub log_blocks_written: u64,
    pub batches: u64,
    pub syncs: u64,
    /// Batches made durable by their own (FUA) write instead of an fdatasync.
    pub durable_writes: u64,
    /// Writes answered before their log write (write-back).
    pub write_back_acks: u64,
    pub checkpoints: u64,
    pub checkpoint_bytes_last: u64,
    pub segments_cleaned: u64,
    /// Device operations that failed and stopped (poisoned) the engine, or would have had it
    /// not already stopped.
    pub io_errors: u64,
    pub poisoned: bool,
}

impl Stats {
    /// Device blocks written per block clients wrote.
    pub fn write_amplification(&self) -> f64 {
        self.log_blocks_written as f64 / self.user_blocks_written.max(1) as f64
    }
}

#[derive(Debug)]
pub enum Request {
    Read {
        volume: VolumeId,
        offset: u64,
        len: u64,
        reply: Reply<Bytes>,
    },
    Write {
        volume: VolumeId,
        offset: u64,
        data: Bytes,
        fua: bool,
        tag: Tag,
        /// May be answered once it is queued in the log, before it is written (write-back; see
        /// [`WRITE_BACK_BLOCKS_MAX`]). Ignored with `fua`.
        write_back: bool,
        reply: Reply<Written>,
    },
    Flush {
        reply: Reply<()>,
    },
    /// Unmaps the whole blocks inside the range; partial blocks at the edges are left alone (trim is
    /// advisory).
    Trim {
        volume: VolumeId,
        offset: u64,
        len: u64,
        tag: Tag,
        reply: Reply<Written>,
    },
    /// Zeroes the range. With `may_trim`, whole blocks become holes; otherwise zero blocks are
    /// written so that the range stays allocated.
    WriteZeroes {
        volume: VolumeId,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
        tag: Tag,
        reply: Reply<Written>,
    },
    BlockStatus {
        volume: VolumeId,
        offset: u64,
        len: u64,
        reply: Reply<Vec<Extent>>,
    },
    /// The CRC32 of every block in a block-aligned range (`None` = unmapped), from the index and
    /// the unapplied writes, without reading data: the state after every request queued before it.
    BlockCrcs {
        volume: VolumeId,
        offset: u64,
        len: u64,
        reply: Reply<Vec<Option<u32>>>,
    },
    /// Where the mapped blocks of the runs (sorted, disjoint, at most [`PLACES_BLOCKS_MAX`]
    /// blocks) lie, in LBA order, from memory: the state after every request queued before it.
    BlockPlaces {
        volume: VolumeId,
        runs: Vec<BlockRun>,
        reply: Reply<Vec<BlockPlace>>,
    },
    /// Writes whole blocks at the named LBAs (at most [`SCATTERED_BLOCKS_MAX`]), in the order
    /// given, as one write: what a replica applies of a copy shipped in log order, where
    /// consecutive blocks are rarely neighbours in the volume.
    WriteBlocks {
        volume: VolumeId,
        blocks: Vec<(u64, Bytes)>,
        tag: Tag,
        reply: Reply<Written>,
    },
    /// Reads the named blocks (at most [`SCATTERED_BLOCKS_MAX`]), in as few device reads as their
    /// places allow: a replica's copy reading in log order. `None` for an unmapped block.
    ReadBlocks {
        volume: VolumeId,
        lbas: Vec<u64>,
        reply: Reply<Vec<Option<Bytes>>>,
    },
    CreateVolume {
        name: String,
        size_bytes: u64,
        reply: Reply<VolumeInfo>,
    },
    ResizeVolume {
        volume: VolumeId,
        size_bytes: u64,
        reply: Reply<()>,
    },
    DeleteVolume {
        volume: VolumeId,
        reply: Reply<()>,
    },
    ListVolumes {
        reply: Reply<Vec<VolumeInfo>>,
    },
    ChangedSince {
        volume: VolumeId,
        since: Since,
        reply: Reply<Vec<ChangedRun>>,
    },
    /// Sets a volume's replication state (see [`MetaOp::SetRepl`]); durable when it replies.
    SetRepl {
        volume: VolumeId,
        last_tag: u64,
        trim_floor: u64,
        attr: Vec<u8>,
        staged: StagedOp,
        reply: Reply<()>,
    },
    Checkpoint {
        reply: Reply<()>,
    },
    Stats {
        reply: Reply<Stats>,
    },
    Shutdown {
        reply: Reply<()>,
    },
}

impl Request {
    /// Whether the request may change stored data or volumes: anything but reads, flushes and
    /// queries.
    pub fn is_mutation(&self) -> bool {
        !matches!(
            self,
            Request::Read { .. }
                | Request::Flush { .. }
                | Request::BlockStatus { .. }
                | Request::BlockCrcs { .. }
                | Request::BlockPlaces { .. }
                | Request::ReadBlocks { .. }
                | Request::ListVolumes { .. }
                | Request::ChangedSince { .. }
                | Request::Stats { .. }
        )
    }
}

/// Tunables. Defaults suit SSD and virtio disks.
#[derive(Debug, Clone)]
pub struct Config {
    /// Batches in flight at once. More overlaps device latency; each is one sequential write.
    /// Large batches (from large writes) may use up to twice as many (`Core::submit_batches`).
    pub max_inflight_batches: usize,
    /// Log bytes between checkpoints: bounds recovery replay (about one second of reading at 1 GB/s).
    pub checkpoint_interval_bytes: u64,
    /// Segments kept free for the cleaner: user writes may not take the last ones, so the cleaner
    /// can always copy a victim forward.
    pub gc_reserve_segments: u32,
    /// Where the engine's event loop runs.
    pub driver: Driver,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            max_inflight_batches: 4,
            checkpoint_interval_bytes: 1 << 30,
            gc_reserve_segments: 2,
            driver: Driver::Thread,
        }
    }
}

/// Where a store's engine runs (see [`crate::Store`]).
#[derive(Debug, Clone, Default)]
pub enum Driver {
    /// A thread of its own. Works from any caller, async or not.
    #[default]
    Thread,
    /// A task on this Tokio runtime (which needs its I/O driver enabled). Saves a hand-off between
    /// threads per batch when the callers run on the same runtime. The runtime must outlive the
    /// store: [`crate::Store::close`] it before shutting the runtime down, or the engine stops
    /// as if the machine had crashed (nothing acknowledged as durable is lost).
    Runtime(tokio::runtime::Handle),
}

/// How a write, trim or zeroing completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// Already durable, with every change queued before it: what a FUA write guarantees, and also
    /// true of a plain write that the engine happened to make durable at once (see
    /// `Core::submit_batches`). A replica reports it so that a flush needs no extra round trip.
    pub durable: bool,
}
