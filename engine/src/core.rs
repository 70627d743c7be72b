//! The engine core: a single-owner state machine that turns requests into device I/O.
//!
//! Events in ([`Core::push_request`], [`Core::on_completion`]), I/O out ([`Core::take_ops`]);
//! replies go straight to each request's oneshot channel. The core never blocks and never touches
//! a file descriptor, so the same code runs on io_uring in production and on the simulated device in
//! the power-cut tests. The driver ([`crate::store`]) owns the loop.
//!
//! The write path, in order:
//! 1. *Intake.* A write (or trim, or zeroing) is split into 4 KiB blocks; partial blocks are merged
//!    with their current content (read-modify-write; intake pauses until that read returns so that
//!    requests stay in arrival order). Blocks go into the *open batch*.
//! 2. *Seal.* When fewer than `max_inflight_batches` batches are in flight, the open batch gets the
//!    next LSN and a place at the log head, and becomes one device write: group commit.
//! 3. *Apply.* Completed batches are applied to the index strictly in LSN order (so a younger batch
//!    completing first can never be overwritten by an older one), then their writes are acknowledged.
//! 4. *Sync.* FLUSH and FUA wait for one shared fdatasync issued once every batch up to their LSN
//!    has completed, or for a batch written durably (FUA) right after a durable one (see
//!    `submit_batches`).
//!
//! Invariants:
//! - The index only points at blocks whose write has completed.
//! - A segment is reused only when nothing live is in it, every record that superseded its blocks
//!   is durable, no read is in flight on it, and it was sealed before the last durable checkpoint
//!   (so recovery from that checkpoint never needs its old contents).
//! - No checkpoint is taken while a batch is in flight or the cleaner holds copies not yet applied,
//!   so a checkpoint equals the state after applying every record below its `next_lsn`.
//! - After a failed write or sync, every later write, trim, flush and volume change fails with
//!   [`Error::Poisoned`].

use std::collections::{BTreeMap, HashMap, VecDeque};

use bytes::{Bytes, BytesMut};
use tokio::sync::oneshot;

use crate::buf::AlignedBuf;
use crate::checkpoint::{CheckpointData, RunRec, SegmentRec, VolumeRec};
use crate::device::{Completion, IoKind, IoOp};
use crate::error::{Error, Result};
use crate::format::{
    block_crc, header_blocks_for, CheckpointHeader, Entry, EntryKind, MetaOp, RecordHeader, RecordKind, SegmentHeader,
    StagedOp, Superblock, MAX_ATTR_BYTES, MAX_ATTR_VOLUMES, MAX_BATCH_BLOCKS, MAX_NAME_BYTES,
};
use crate::index::{crc_of, phys_of};
use crate::predict::CommitLoop;
use crate::state::{State, VolumeInfo, MAX_VOLUMES};
use crate::types::{Lba, Lsn, SegmentId, Tag, VolumeId, BLOCK_BYTES};

const BB: u64 = BLOCK_BYTES as u64;

/// Largest byte count of one read or write request: 32 MiB, the largest payload NBD clients send
/// and the figure NBD servers conventionally advertise as their maximum block size. It bounds the
/// memory one request can pin.
pub const MAX_IO_BYTES: u64 = 32 << 20;

/// Most blocks the cleaner adds to one batch, so that foreground writes always get at least half of
/// every batch while the cleaner runs.
/// The hasher of the pending-block map, keyed by (volume, LBA). A 1 MiB write inserts, looks up
/// and removes 256 consecutive LBAs; with SipHash each went to a random bucket, a cache miss
/// apiece, and the lookups when a batch completes took 9 % of the server's time in sequential
/// writes. This one keeps the LBA's low bits as the bucket index, so consecutive blocks share
/// cache lines, and mixes all the bits into the top seven, which hashbrown uses as the tag that
/// filters a probe: neighbours in one probe group still have distinct tags.
#[derive(Default, Clone, Copy)]
struct BlockHasher(u64);

impl std::hash::Hasher for BlockHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Not reached for (VolumeId, u64) keys, which use the typed methods; correct for any key.
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u32(&mut self, v: u32) {
        // The volume id: far above any LBA's low bits.
        self.0 ^= u64::from(v).rotate_right(20);
    }
    fn write_u64(&mut self, v: u64) {
        self.0 ^= v;
    }
    fn finish(&self) -> u64 {
        const TAG: u64 = 0x7f << 57;
        let mixed = self.0.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (self.0 & !TAG) | (mixed & TAG)
    }
}

type BlockHash = std::hash::BuildHasherDefault<BlockHasher>;

/// A log write this large (512 KiB) counts as bandwidth-bound (see [`Core::submit_batches`]).
const BIG_BATCH_BLOCKS: usize = MAX_BATCH_BLOCKS as usize / 2;

/// Write-back answers a write once it is queued only while at most this many user blocks (16 MiB)
/// are queued and not yet written; beyond it, writes are answered when written, which paces a
/// client to the disk. The figure bounds what a crash of the process can lose of writes that were
/// answered but not flushed (NBD promises nothing for those) and the memory they pin. 16 MiB is
/// four full batches in flight (the default `max_inflight_batches`) and three times as many
/// queued behind them: enough that a sequential writer with 8 MiB in flight never waits on it,
/// and well under a second of this disk's sequential bandwidth.
pub const WRITE_BACK_MAX_BLOCKS: u64 = 4096;

const GC_BLOCKS_PER_BATCH_MAX: usize = MAX_BATCH_BLOCKS as usize / 2;

/// Most blocks one [`Request::BlockCrcs`] may cover: 256 MiB of volume, a 512 KiB answer. A
/// replicator compares checksums window by window; this bounds the memory one request pins.
pub const MAX_CRC_BLOCKS: u64 = 1 << 16;

/// Sealed batches allowed to wait behind the in-flight limit before intake pauses. One maximal
/// write (32 MiB) seals up to 32 batches at once; beyond that, queueing more only adds latency.
const SEALED_QUEUE_MAX: usize = 40;

static ZERO_BLOCK: [u8; BLOCK_BYTES] = [0; BLOCK_BYTES];

pub type Reply<T> = oneshot::Sender<Result<T>>;

/// A run of blocks and whether they are mapped, for NBD block status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangedRun {
    pub lba: Lba,
    pub n_blocks: u64,
}

/// Engine counters.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub next_lsn: Lsn,
    pub durable_lsn: Lsn,
    pub n_segments: u32,
    pub free_segments: u32,
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
        /// [`WRITE_BACK_MAX_BLOCKS`]). Ignored with `fua`.
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

// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SegStatus {
    Free,
    /// The log head writes here.
    Open,
    Sealed,
    /// The cleaner is copying its live blocks forward.
    Victim,
    /// Empty, waiting for the conditions of reuse.
    PendingFree,
}

#[derive(Debug, Clone)]
pub(crate) struct SegState {
    pub status: SegStatus,
    pub seq: u64,
    pub used_blocks: u32,
    pub min_data_lsn: u64,
    pub max_data_lsn: u64,
    pub max_lsn: u64,
    /// Sealed batches targeting this segment, not yet applied.
    pub inflight_batches: u32,
    /// Reads in flight on this segment.
    pub readers: u32,
    /// Set when a live block failed its checksum during cleaning: never clean it again.
    pub gc_skip: bool,
    /// Cleaned, yet some blocks stayed live (their copies were superseded by writes not yet
    /// applied, or moved out of a resync's staging by its commit): not chosen again until one of
    /// its blocks dies, so the cleaner does not spin on it.
    pub gc_leftover: bool,
    /// For PendingFree: the LSN that must be durable before reuse.
    pub free_after_lsn: Lsn,
    /// Per volume, the highest tag of a trim entry in this segment (at most
    /// [`MAX_TRIM_TAGS_PER_SEGMENT`]; beyond that one wildcard entry for volume `u32::MAX`).
    pub trim_tags: Vec<(u32, u64)>,
}

/// Volumes whose trim tags a segment tracks one by one. Past this, the segment keeps one wildcard
/// entry with the highest tag, which pins it for every retaining volume: conservative, and it keeps
/// the checkpoint's per-segment record bounded (the slot is sized for this many).
pub const MAX_TRIM_TAGS_PER_SEGMENT: usize = 8;

/// Volume id of the wildcard trim-tag entry.
pub const ANY_VOLUME: u32 = u32::MAX;

impl SegState {
    /// Notes the trim entries of a record written to this segment.
    pub fn note_trims(&mut self, entries: &[Entry]) {
        for e in entries.iter().filter(|e| e.kind == EntryKind::Trim && e.tag != 0) {
            let v = if self.trim_tags.first().is_some_and(|t| t.0 == ANY_VOLUME) { ANY_VOLUME } else { e.volume.0 };
            let n = self.trim_tags.len();
            match self.trim_tags.iter_mut().find(|t| t.0 == v) {
                Some(t) => t.1 = t.1.max(e.tag),
                None if n < MAX_TRIM_TAGS_PER_SEGMENT => self.trim_tags.push((v, e.tag)),
                None => {
                    let max = self.trim_tags.iter().map(|t| t.1).max().unwrap_or(0).max(e.tag);
                    self.trim_tags = vec![(ANY_VOLUME, max)];
                }
            }
        }
    }
}

impl SegState {
    pub fn from_rec(r: &SegmentRec) -> SegState {
        SegState {
            status: if r.used_blocks == 0 { SegStatus::Free } else { SegStatus::Sealed },
            seq: r.seq,
            used_blocks: r.used_blocks,
            min_data_lsn: r.min_data_lsn,
            max_data_lsn: r.max_data_lsn,
            max_lsn: r.max_lsn,
            inflight_batches: 0,
            readers: 0,
            gc_skip: false,
            gc_leftover: false,
            free_after_lsn: Lsn(0),
            trim_tags: r.trim_tags.clone(),
        }
    }
}

/// What happens when a writer's last batch is applied.
enum Done {
    /// Already answered (a write-back write); nobody waits any more.
    Answered,
    Unit(Reply<()>),
    Write(Reply<Written>),
    Volume(Reply<VolumeInfo>, VolumeInfo),
}

impl Done {
    /// Answers a failure, or a success without a durability claim.
    fn send(self, result: Result<()>) {
        match result {
            Ok(()) => self.succeed(false),
            Err(e) => match self {
                Done::Answered => {}
                Done::Unit(r) => drop(r.send(Err(e))),
                Done::Write(r) => drop(r.send(Err(e))),
                Done::Volume(r, _) => drop(r.send(Err(e))),
            },
        }
    }

    /// Answers a success; `durable`: the change (and everything queued before it) is durable.
    fn succeed(self, durable: bool) {
        match self {
            Done::Answered => {}
            Done::Unit(r) => drop(r.send(Ok(()))),
            Done::Write(r) => drop(r.send(Ok(Written { durable }))),
            Done::Volume(r, info) => drop(r.send(Ok(info))),
        }
    }
}

/// How a write, trim or zeroing completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// Already durable, with every change queued before it: what a FUA write guarantees, and also
    /// true of a plain write that the engine happened to make durable at once (see
    /// `Core::submit_batches`). A replica reports it so that a flush needs no extra round trip.
    pub durable: bool,
}

struct Waiter {
    remaining: u32,
    durable: bool,
    max_lsn: Lsn,
    done: Done,
}

/// A block source in a write operation after intake.
enum Piece {
    /// Whole blocks of data (`data.len()` is a multiple of the block size).
    Data {
        lba: u64,
        data: Bytes,
    },
    /// Part of one block: `data` goes at byte `at` of block `lba`.
    Partial {
        lba: u64,
        at: usize,
        data: Bytes,
    },
    Unmap {
        lba: u64,
        n_blocks: u64,
    },
    /// Whole blocks of written zeros.
    Zero {
        lba: u64,
        n_blocks: u64,
    },
}

struct WriteOp {
    volume: VolumeId,
    tag: Tag,
    pieces: Vec<Piece>,
    durable: bool,
    /// Answer once queued in the log if the write-back budget allows (see [`WRITE_BACK_MAX_BLOCKS`]).
    write_back: bool,
    done: Done,
}

struct OpenBatch {
    no: u64,
    seg: u32,
    /// Block (within the segment) where this batch's buffer starts.
    start_block: u32,
    with_seg_header: bool,
    entries: Vec<Entry>,
    crcs: Vec<u32>,
    data: Vec<Bytes>,
    waiters: Vec<u64>,
    meta: Option<MetaOp>,
    gc_blocks: usize,
    /// Blocks touched, for the pending-write map cleanup.
    touched: Vec<(VolumeId, u64)>,
    unmaps: Vec<(VolumeId, u64, u64)>,
}

struct Batch {
    no: u64,
    seg: u32,
    first_data_phys: u32,
    kind: RecordKind,
    entries: Vec<Entry>,
    crcs: Vec<u32>,
    waiters: Vec<u64>,
    touched: Vec<(VolumeId, u64)>,
    unmaps: Vec<(VolumeId, u64, u64)>,
    completed: bool,
    /// Cleaner victim whose copies this batch carries, with how many.
    gc_victim: Option<(u32, usize)>,
    /// Someone waits for this batch to be durable (a FUA write, a volume change, a flush that
    /// sealed it): write it durably if that is possible (see [`Core::submit_batches`]).
    want_durable: bool,
    /// Submitted as a durable write, with every earlier batch durable at that moment.
    durable_write: bool,
    /// Blocks of user data (not cleaner copies) in it: counted in [`Core::unwritten_blocks`].
    user_blocks: u64,
}

/// A block whose newest write has not been applied yet: reads and read-modify-writes see it.
struct PendingBlock {
    batch_no: u64,
    /// None: unmapped (reads as zeros).
    data: Option<Bytes>,
}

enum Token {
    Batch(Lsn),
    Sync { through: Lsn },
    Read { read_id: u64, block_idx: usize, n_blocks: usize, seg: u32, crcs: Vec<u32>, phys: u32 },
    RmwRead { lba: u64, seg: u32, crc: u32, phys: u32 },
    GcRead { seg: u32 },
    ScanRead { seg: u32 },
    CheckpointWrite,
}

struct ReadWaiter {
    /// None when one device read covers the whole reply (its buffer becomes the reply).
    buf: Option<BytesMut>,
    head: usize,
    len: usize,
    remaining: usize,
    error: Option<Error>,
    reply: Reply<Bytes>,
}

enum Stall {
    /// Read-modify-write reads outstanding for the op at the head of intake.
    Rmw { op: WriteOp, bases: HashMap<u64, Bytes>, outstanding: usize, error: Option<Error> },
    /// A write waits for the cleaner to free space.
    Space { op: WriteOp, n_blocks: u64 },
}

enum CkptPhase {
    Idle,
    /// Wait for the cleaner to finish its victim, then for in-flight batches to drain.
    Draining,
    SyncBefore {
        through: Lsn,
        header: CheckpointHeader,
        buf: Option<AlignedBuf>,
    },
    Writing {
        header: CheckpointHeader,
    },
    SyncAfter {
        header: CheckpointHeader,
    },
}

enum Gc {
    Idle,
    Reading,
    /// Copies of `seg` queued or in flight.
    Copying {
        seg: u32,
        queued: VecDeque<GcCopy>,
        in_flight: usize,
    },
}

struct GcCopy {
    volume: VolumeId,
    tag: Tag,
    lba: u64,
    old_phys: u32,
    data_lsn: Lsn,
    data: Bytes,
}

struct Scan {
    volume: VolumeId,
    since: Since,
    segs: Vec<u32>,
    /// Changed ranges `(first, end)`, merged when the scan ends.
    found: Vec<(u64, u64)>,
    reply: Reply<Vec<ChangedRun>>,
}

pub struct Core {
    sb: Superblock,
    cfg: Config,
    pub(crate) state: State,
    pub(crate) segs: Vec<SegState>,
    n_free: usize,
    /// Segments in PendingFree: the per-step scans for reusable segments run only when non-zero.
    n_pending_free: usize,
    /// What [`Core::step_free`] last scanned under (durable LSN, reuse bound, pending count, low
    /// on space, checkpoint idle); `None` after a segment lost a reader.
    free_scan_key: Option<(Lsn, u64, usize, bool, bool)>,
    /// Bumped on every segment state change, so `run` notices progress that changes nothing else.
    progress: usize,
    next_lsn: Lsn,
    next_seg_seq: u64,
    ckpt_seq: u64,
    /// The checkpoint recovery started from; the cleaner waits until a newer one is durable.
    recovered_from_ckpt_seq: u64,
    log_blocks_at_ckpt: u64,
    /// Highest LSN such that it and everything before it is on stable storage.
    durable_lsn: Lsn,
    open_seg: Option<(u32, u32)>,
    open_batch: Option<OpenBatch>,
    batch_no: u64,
    batches: BTreeMap<Lsn, Batch>,
    /// Sealed batches not yet handed to the device, in LSN order: (lsn, device offset, bytes).
    unsubmitted: VecDeque<(Lsn, u64, AlignedBuf)>,
    pending: HashMap<(VolumeId, u64), PendingBlock, BlockHash>,
    /// User data blocks queued in the log but not yet written (open, unsubmitted and in-flight
    /// batches): what write-back has at risk, bounded by [`WRITE_BACK_MAX_BLOCKS`].
    unwritten_blocks: u64,
    pending_unmaps: Vec<(u64, VolumeId, u64, u64)>,
    /// Ordered, so that failing them all (`fail_everything`) answers in a reproducible order.
    waiters: BTreeMap<u64, Waiter>,
    next_waiter: u64,
    sync_waiters: Vec<(Lsn, u64)>,
    sync_in_flight: bool,
    /// Batches with client writes against flushes and FUA writes; see [`Core::submit_batches`].
    commit_loop: CommitLoop,
    reads: HashMap<u64, ReadWaiter, BlockHash>,
    next_read: u64,
    intake: VecDeque<Request>,
    stall: Option<Stall>,
    ckpt: CkptPhase,
    ckpt_waiters: Vec<Reply<()>>,
    ckpt_in_progress_waiters: Vec<Reply<()>>,
    ckpt_wanted: bool,
    ckpt_sync_after_token: Option<u64>,
    /// Segments whose seq is below this were sealed before the last durable checkpoint's tail.
    reuse_below_seq: u64,
    gc: Gc,
    scans: VecDeque<Scan>,
    scan_busy: bool,
    shutdown: Option<Reply<()>>,
    finished: bool,
    poisoned: Option<String>,
    tokens: HashMap<u64, Token, BlockHash>,
    next_token: u64,
    out: Vec<IoOp>,
    stats: Stats,
}

fn err_poisoned(cause: &Option<String>) -> Option<Error> {
    cause.as_ref().map(|c| Error::Poisoned { cause: c.clone() })
}

impl Core {
    /// A core over recovered state. `durable_lsn` is the last LSN recovered (all of it durable).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        sb: Superblock,
        cfg: Config,
        state: State,
        segs: Vec<SegState>,
        next_lsn: Lsn,
        next_seg_seq: u64,
        ckpt_seq: u64,
    ) -> Core {
        let mut stats =
            Stats { n_segments: sb.n_segments, segment_bytes: sb.segment_blocks as u64 * BB, ..Stats::default() };
        stats.next_lsn = next_lsn;
        Core {
            sb,
            cfg,
            state,
            n_free: segs.iter().filter(|s| s.status == SegStatus::Free).count(),
            n_pending_free: segs.iter().filter(|s| s.status == SegStatus::PendingFree).count(),
            free_scan_key: None,
            segs,
            progress: 0,
            next_lsn,
            next_seg_seq,
            ckpt_seq,
            recovered_from_ckpt_seq: ckpt_seq,
            log_blocks_at_ckpt: 0,
            durable_lsn: Lsn(next_lsn.0 - 1),
            open_seg: None,
            open_batch: None,
            batch_no: 0,
            batches: BTreeMap::new(),
            unsubmitted: VecDeque::new(),
            pending: HashMap::default(),
            unwritten_blocks: 0,
            pending_unmaps: Vec::new(),
            waiters: BTreeMap::new(),
            next_waiter: 0,
            sync_waiters: Vec::new(),
            sync_in_flight: false,
            reads: HashMap::default(),
            next_read: 0,
            intake: VecDeque::new(),
            stall: None,
            ckpt: CkptPhase::Idle,
            ckpt_waiters: Vec::new(),
            ckpt_in_progress_waiters: Vec::new(),
            // Recovery ends with a checkpoint, before anything else is written.
            ckpt_wanted: true,
            ckpt_sync_after_token: None,
            reuse_below_seq: next_seg_seq,
            gc: Gc::Idle,
            scans: VecDeque::new(),
            scan_busy: false,
            shutdown: None,
            finished: false,
            poisoned: None,
            commit_loop: CommitLoop::default(),
            tokens: HashMap::default(),
            next_token: 0,
            out: Vec::new(),
            stats,
        }
    }

    pub fn push_request(&mut self, req: Request) {
        self.intake.push_back(req);
    }

    pub fn take_ops(&mut self) -> Vec<IoOp> {
        std::mem::take(&mut self.out)
    }

    /// True once a shutdown request has been fully served.
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// True when nothing is in progress and everything ever written is durable: a flush now would
    /// have nothing to wait for.
    pub fn all_durable(&self) -> bool {
        self.poisoned.is_none()
            && self.intake.is_empty()
            && self.stall.is_none()
            && self.open_batch.as_ref().is_none_or(|b| b.entries.is_empty() && b.meta.is_none())
            && self.batches.is_empty()
            && self.durable_lsn.next() == self.next_lsn
            && self.shutdown.is_none()
    }

    /// Flushes answered by the driver without a trip here, because everything was durable already
    /// (see [`Core::all_durable`]): they count for the prediction in [`Core::submit_batches`].
    pub fn note_flushes(&mut self, n: u64) {
        for _ in 0..n.min(CommitLoop::streak_max()) {
            self.commit_loop.note_flush();
        }
    }

    /// True when I/O is in flight, so the driver should wait on the device.
    pub fn io_in_flight(&self) -> bool {
        !self.tokens.is_empty()
    }

    fn submit(&mut self, token: Token, kind: IoKind) {
        let id = self.next_token;
        self.next_token += 1;
        self.tokens.insert(id, token);
        self.out.push(IoOp { token: id, kind });
    }

    fn seg_offset_bytes(&self, seg: u32, block: u32) -> u64 {
        self.sb.segment_offset(seg) + block as u64 * BB
    }

    fn phys(&self, seg: u32, block: u32) -> u32 {
        seg * self.sb.segment_blocks + block
    }

    fn phys_offset_bytes(&self, phys: u32) -> u64 {
        self.sb.data_offset + phys as u64 * BB
    }

    /// The device itself failed (not one op): stop as after a failed write.
    pub fn device_failed(&mut self, cause: String) {
        self.poison(cause);
        self.fail_everything();
    }

    fn poison(&mut self, cause: String) {
        self.stats.io_errors += 1;
        if self.poisoned.is_none() {
            tracing::error!("engine poisoned, refusing further writes: {cause}");
            self.poisoned = Some(cause);
            self.stats.poisoned = true;
        }
    }

    // -----------------------------------------------------------------------------------------
    // The step function.

    /// Processes queued requests and advances every background machine; call after pushing requests
    /// and after completions.
    pub fn run(&mut self) {
        for _ in 0..64 {
            let before = self.fingerprint();
            self.process_intake();
            self.step_gc();
            self.seal_and_submit();
            self.step_syncs();
            self.reply_synced();
            self.step_checkpoint();
            self.step_free();
            self.step_scans();
            self.step_shutdown();
            let after = self.fingerprint();
            if before == after {
                if self.tokens.is_empty()
                    && (after[0] > 0 || after[1] > 0 || after[8] > 0 || after[9] > 0 || after[4] > 0)
                {
                    // Nothing in flight yet work is waiting: nothing will ever wake it. A bug.
                    tracing::error!(
                        "engine idle with pending work: {after:?} stall={} free={} gc_low={} ckpt_wanted={} reuse_below={}",
                        match &self.stall { Some(Stall::Rmw { .. }) => "rmw", Some(Stall::Space { .. }) => "space", None => "none" },
                        self.free_segments(), self.gc_low_segments(), self.ckpt_wanted, self.reuse_below_seq
                    );
                }
                break;
            }
        }
    }

    /// A summary that changes whenever a step made progress; `run` repeats until it is stable.
    fn fingerprint(&self) -> [usize; 13] {
        let ckpt = match self.ckpt {
            CkptPhase::Idle => 0,
            CkptPhase::Draining => 1,
            CkptPhase::SyncBefore { .. } => 2,
            CkptPhase::Writing { .. } => 3,
            CkptPhase::SyncAfter { .. } => 4,
        };
        // The cleaner's queue length and copies in flight count too: dropping stale copies changes
        // nothing else, yet lets the victim finish on the next pass.
        let gc = match &self.gc {
            Gc::Idle => 0,
            Gc::Reading => 1,
            Gc::Copying { queued, in_flight, .. } => 2 + 4 * (queued.len() + 1) + 4 * (1 << 20) * *in_flight,
        };
        [
            self.intake.len(),
            self.stall.is_some() as usize,
            self.batches.len(),
            self.out.len(),
            ckpt,
            gc,
            self.unsubmitted.len(),
            self.open_batch.is_some() as usize,
            self.sync_waiters.len(),
            self.waiters.len(),
            self.ckpt_wanted as usize + 2 * self.shutdown.is_some() as usize + 4 * self.finished as usize,
            self.scans.len(),
            self.progress,
        ]
    }

    fn process_intake(&mut self) {
        // Backpressure: stop taking requests while sealed batches queue up behind the in-flight
        // limit, and while a checkpoint waits for in-flight batches to drain.
        if self.unsubmitted.len() >= SEALED_QUEUE_MAX || self.draining_io() {
            return;
        }
        if let Some(Stall::Space { .. }) = &self.stall {
            let Some(Stall::Space { op, n_blocks }) = self.stall.take() else { unreachable!() };
            if self.poisoned.is_some() {
                op.done.send(Err(err_poisoned(&self.poisoned).expect("poisoned")));
            } else if self.space_for_user(n_blocks) {
                self.add_write(op);
            } else if self.gc_can_help() {
                self.stall = Some(Stall::Space { op, n_blocks });
                return;
            } else {
                tracing::warn!(
                    "write refused: store full ({} free segments, nothing left to clean)",
                    self.free_segments()
                );
                op.done.send(Err(Error::NoSpace));
            }
        }
        while self.stall.is_none() && self.unsubmitted.len() < SEALED_QUEUE_MAX {
            let is_meta = matches!(
                self.intake.front(),
                Some(
                    Request::CreateVolume { .. }
                        | Request::ResizeVolume { .. }
                        | Request::DeleteVolume { .. }
                        | Request::SetRepl { .. }
                )
            );
            if is_meta && (!self.batches.is_empty() || self.open_batch.as_ref().is_some_and(|b| !b.entries.is_empty()))
            {
                // Volume-table changes take effect in memory at once, so every earlier write must
                // be applied first, or the live engine and replay would disagree on the order.
                self.seal_open_batch();
                break;
            }
            let Some(req) = self.intake.pop_front() else { break };
            self.handle(req);
        }
    }

    fn handle(&mut self, req: Request) {
        match req {
            Request::Read { volume, offset, len, reply } => self.handle_read(volume, offset, len, reply),
            Request::Write { volume, offset, data, fua, tag, write_back, reply } => {
                let len = data.len() as u64;
                match self.check_write(volume, offset, len) {
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                    Ok(()) if len == 0 => {
                        let _ = reply.send(Ok(Written { durable: false }));
                    }
                    Ok(()) => {
                        let pieces = split_write(offset, data);
                        self.start_write(WriteOp {
                            volume,
                            tag,
                            pieces,
                            durable: fua,
                            write_back: write_back && !fua,
                            done: Done::Write(reply),
                        });
                    }
                }
            }
            Request::Trim { volume, offset, len, tag, reply } => match self.check_range(volume, offset, len, false) {
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
                Ok(()) => {
                    let first = offset.div_ceil(BB);
                    let end = (offset + len) / BB;
                    let pieces =
                        if end > first { vec![Piece::Unmap { lba: first, n_blocks: end - first }] } else { vec![] };
                    self.start_write(WriteOp {
                        volume,
                        tag,
                        pieces,
                        durable: false,
                        write_back: false,
                        done: Done::Write(reply),
                    });
                }
            },
            Request::WriteZeroes { volume, offset, len, may_trim, fua, tag, reply } => {
                match self.check_range(volume, offset, len, false) {
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                    Ok(()) => {
                        let pieces = split_zeroes(offset, len, may_trim);
                        self.start_write(WriteOp {
                            volume,
                            tag,
                            pieces,
                            durable: fua,
                            write_back: false,
                            done: Done::Write(reply),
                        });
                    }
                }
            }
            Request::Flush { reply } => {
                if let Some(e) = err_poisoned(&self.poisoned) {
                    let _ = reply.send(Err(e));
                    return;
                }
                // Everything submitted before the flush, not just what was acknowledged: simpler to
                // reason about and costs nothing extra, as the open batch is sealed anyway.
                let id = self.add_waiter(0, true, Done::Unit(reply));
                self.close_open_batch_for_flush(id);
            }
            Request::BlockStatus { volume, offset, len, reply } => {
                let _ = reply.send(self.block_status(volume, offset, len));
            }
            Request::BlockCrcs { volume, offset, len, reply } => {
                let _ = reply.send(self.block_crcs(volume, offset, len));
            }
            Request::CreateVolume { name, size_bytes, reply } => self.create_volume(name, size_bytes, reply),
            Request::ResizeVolume { volume, size_bytes, reply } => {
                let r = self.check_meta().and_then(|()| {
                    let vol = self.state.volumes.get(&volume).ok_or(Error::NoSuchVolume(volume))?;
                    check_size(size_bytes)?;
                    let _ = vol;
                    Ok(())
                });
                match r {
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                    Ok(()) => self.meta_op(MetaOp::Resize { volume, size_bytes }, Done::Unit(reply)),
                }
            }
            Request::DeleteVolume { volume, reply } => {
                let r = self
                    .check_meta()
                    .and_then(|()| self.state.volumes.get(&volume).map(|_| ()).ok_or(Error::NoSuchVolume(volume)));
                match r {
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                    Ok(()) => self.meta_op(MetaOp::Delete { volume }, Done::Unit(reply)),
                }
            }
            Request::ListVolumes { reply } => {
                let list = self.state.volumes.values().map(|v| self.state.volume_info(v)).collect();
                let _ = reply.send(Ok(list));
            }
            Request::ChangedSince { volume, since, reply } => {
                if !self.state.volumes.contains_key(&volume) {
                    let _ = reply.send(Err(Error::NoSuchVolume(volume)));
                    return;
                }
                let segs = (0..self.sb.n_segments)
                    .filter(|s| {
                        let st = &self.segs[*s as usize];
                        let live = self.state.live[*s as usize] > 0;
                        st.used_blocks > 0
                            && st.status != SegStatus::Free
                            && match since {
                                Since::Lsn(lsn) => live && st.max_data_lsn > lsn.0,
                                Since::Tag(_) => live || !st.trim_tags.is_empty(),
                            }
                    })
                    .collect();
                self.scans.push_back(Scan { volume, since, segs, found: Vec::new(), reply });
            }
            Request::SetRepl { volume, last_tag, trim_floor, attr, staged, reply } => {
                let r = self.check_meta().and_then(|()| {
                    self.state.volumes.get(&volume).ok_or(Error::NoSuchVolume(volume))?;
                    if attr.len() > MAX_ATTR_BYTES {
                        return Err(Error::InvalidArgument(format!(
                            "replication attribute of {} bytes exceeds {MAX_ATTR_BYTES}",
                            attr.len()
                        )));
                    }
                    let others = self.state.volumes.values().filter(|v| v.id != volume && !v.attr.is_empty()).count();
                    if !attr.is_empty() && others >= MAX_ATTR_VOLUMES {
                        return Err(Error::InvalidArgument(format!(
                            "{MAX_ATTR_VOLUMES} volumes of this store are already replicated; use another store"
                        )));
                    }
                    Ok(())
                });
                match r {
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                    Ok(()) => {
                        let op = MetaOp::SetRepl { volume, last_tag, trim_floor, attr, staged };
                        self.meta_op(op, Done::Unit(reply));
                        // A raised floor may unpin segments that are already empty.
                        for seg in 0..self.sb.n_segments {
                            self.check_segment_empty(seg);
                        }
                    }
                }
            }
            Request::Checkpoint { reply } => {
                if let Some(e) = err_poisoned(&self.poisoned) {
                    let _ = reply.send(Err(e));
                    return;
                }
                self.ckpt_waiters.push(reply);
                self.ckpt_wanted = true;
            }
            Request::Stats { reply } => {
                let _ = reply.send(Ok(self.stats()));
            }
            Request::Shutdown { reply } => {
                self.shutdown = Some(reply);
                if self.poisoned.is_none() {
                    self.ckpt_wanted = true;
                }
            }
        }
    }

    pub fn stats(&self) -> Stats {
        let mut s = self.stats.clone();
        s.next_lsn = self.next_lsn;
        s.durable_lsn = self.durable_lsn;
        s.free_segments = self.free_segments() as u32;
        s.live_blocks = self.state.live.iter().map(|l| *l as u64).sum();
        s.index_heap_bytes = self.state.volumes.values().map(|v| v.index.heap_bytes() as u64).sum();
        s
    }

    fn free_segments(&self) -> usize {
        debug_assert_eq!(self.n_free, self.segs.iter().filter(|s| s.status == SegStatus::Free).count());
        self.n_free
    }

    /// Changes a segment's status, keeping the free count (consulted on every write) exact.
    fn set_status(&mut self, seg: u32, status: SegStatus) {
        let st = &mut self.segs[seg as usize];
        if st.status == SegStatus::Free {
            self.n_free -= 1;
        }
        if status == SegStatus::Free {
            self.n_free += 1;
        }
        if st.status == SegStatus::PendingFree {
            self.n_pending_free -= 1;
        }
        if status == SegStatus::PendingFree {
            self.n_pending_free += 1;
        }
        st.status = status;
        self.progress += 1;
    }

    // -----------------------------------------------------------------------------------------
    // Validation.

    fn check_range(&self, volume: VolumeId, offset: u64, len: u64, is_read: bool) -> Result<()> {
        if !is_read {
            if let Some(e) = err_poisoned(&self.poisoned) {
                return Err(e);
            }
        }
        let vol = self.state.volumes.get(&volume).ok_or(Error::NoSuchVolume(volume))?;
        match offset.checked_add(len) {
            Some(end) if end <= vol.size_bytes => Ok(()),
            _ => Err(Error::OutOfRange { volume, offset, len, size: vol.size_bytes }),
        }
    }

    fn check_write(&self, volume: VolumeId, offset: u64, len: u64) -> Result<()> {
        if len > MAX_IO_BYTES {
            return Err(Error::TooLarge { len, limit: MAX_IO_BYTES });
        }
        self.check_range(volume, offset, len, false)
    }

    fn check_meta(&self) -> Result<()> {
        match err_poisoned(&self.poisoned) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Reads.

    fn handle_read(&mut self, volume: VolumeId, offset: u64, len: u64, reply: Reply<Bytes>) {
        if len > MAX_IO_BYTES {
            let _ = reply.send(Err(Error::TooLarge { len, limit: MAX_IO_BYTES }));
            return;
        }
        if let Err(e) = self.check_range(volume, offset, len, true) {
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
                if let Some(p) = self.pending.get(&(volume, lba)) {
                    let b = assembled(&mut buf, n_blocks);
                    if let Some(data) = &p.data {
                        b[i * BLOCK_BYTES..(i + 1) * BLOCK_BYTES].copy_from_slice(data);
                    }
                    continue;
                }
                if self.pending_unmaps.iter().any(|(_, v, s, e)| *v == volume && (*s..*e).contains(&lba)) {
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
        let read_id = self.next_read;
        self.next_read += 1;
        self.reads
            .insert(read_id, ReadWaiter { buf, head, len: len as usize, remaining: runs.len(), error: None, reply });
        for (block_idx, phys, crcs) in runs {
            let seg = phys / self.sb.segment_blocks;
            self.segs[seg as usize].readers += 1;
            let n = crcs.len();
            let offset = self.phys_offset_bytes(phys);
            self.submit(
                Token::Read { read_id, block_idx, n_blocks: n, seg, crcs, phys },
                IoKind::Read { offset, buf: AlignedBuf::zeroed(n) },
            );
        }
    }

    fn corrupt_error(&self, seg: u32, phys: u32, what: String) -> Error {
        let st = &self.segs[seg as usize];
        Error::Corrupt {
            segment: SegmentId(seg),
            lsn_range: format!("{}..={}", st.min_data_lsn, st.max_lsn),
            offset: self.phys_offset_bytes(phys),
            what,
        }
    }

    // -----------------------------------------------------------------------------------------
    // Writes.

    fn add_waiter(&mut self, remaining: u32, durable: bool, done: Done) -> u64 {
        let id = self.next_waiter;
        self.next_waiter += 1;
        self.waiters.insert(id, Waiter { remaining, durable, max_lsn: Lsn(0), done });
        id
    }

    /// Intake of a write-like op: resolve partial blocks (maybe by reading), then add to batches.
    fn start_write(&mut self, op: WriteOp) {
        let mut bases = HashMap::new();
        let mut outstanding = 0;
        let volume = op.volume;
        for piece in &op.pieces {
            let Piece::Partial { lba, .. } = piece else { continue };
            if bases.contains_key(lba) {
                continue;
            }
            match self.current_block(volume, *lba) {
                CurrentBlock::Known(b) => {
                    bases.insert(*lba, b);
                }
                CurrentBlock::OnDisk { phys, crc } => {
                    let seg = phys / self.sb.segment_blocks;
                    self.segs[seg as usize].readers += 1;
                    let offset = self.phys_offset_bytes(phys);
                    self.submit(
                        Token::RmwRead { lba: *lba, seg, crc, phys },
                        IoKind::Read { offset, buf: AlignedBuf::zeroed(1) },
                    );
                    outstanding += 1;
                }
            }
        }
        if outstanding > 0 {
            self.stall = Some(Stall::Rmw { op, bases, outstanding, error: None });
            return;
        }
        self.finish_intake(op, bases);
    }

    fn finish_intake(&mut self, mut op: WriteOp, bases: HashMap<u64, Bytes>) {
        // Merge partial pieces into whole blocks, in order (two partials may hit one block).
        let mut merged: HashMap<u64, BytesMut> = HashMap::new();
        let mut pieces = Vec::with_capacity(op.pieces.len());
        for piece in op.pieces.drain(..) {
            match piece {
                Piece::Partial { lba, at, data } => {
                    let block = merged.entry(lba).or_insert_with(|| BytesMut::from(&bases[&lba][..]));
                    block[at..at + data.len()].copy_from_slice(&data);
                    if !pieces.iter().any(|p| matches!(p, Piece::Partial { lba: l, .. } if *l == lba)) {
                        pieces.push(Piece::Partial { lba, at: 0, data: Bytes::new() });
                    }
                }
                other => pieces.push(other),
            }
        }
        let pieces = pieces
            .into_iter()
            .map(|p| match p {
                Piece::Partial { lba, .. } => Piece::Data { lba, data: merged.remove(&lba).expect("merged").freeze() },
                other => other,
            })
            .collect();
        op.pieces = pieces;
        let n_blocks: u64 = op
            .pieces
            .iter()
            .map(|p| match p {
                Piece::Data { data, .. } => data.len() as u64 / BB,
                Piece::Zero { n_blocks, .. } => *n_blocks,
                _ => 0,
            })
            .sum();
        if self.space_for_user(n_blocks) {
            self.add_write(op);
        } else if self.gc_can_help() {
            tracing::debug!("write of {n_blocks} blocks waits for the cleaner");
            self.stall = Some(Stall::Space { op, n_blocks });
        } else {
            tracing::warn!("write refused: store full ({} free segments, nothing left to clean)", self.free_segments());
            op.done.send(Err(Error::NoSpace));
        }
    }

    /// Adds an intake-complete write to the open batch(es).
    fn add_write(&mut self, op: WriteOp) {
        if op.durable {
            self.commit_loop.note_flush();
        }
        let write_back = op.write_back && !op.durable;
        let waiter = self.add_waiter(0, op.durable, op.done);
        let volume = op.volume;
        let tag = op.tag;
        for piece in op.pieces {
            match piece {
                Piece::Data { lba, data } => {
                    let n = data.len() / BLOCK_BYTES;
                    for i in 0..n {
                        let block = data.slice(i * BLOCK_BYTES..(i + 1) * BLOCK_BYTES);
                        self.add_block(volume, lba + i as u64, block, waiter, None, tag);
                    }
                }
                Piece::Zero { lba, n_blocks } => {
                    for i in 0..n_blocks {
                        self.add_block(volume, lba + i, Bytes::from_static(&ZERO_BLOCK), waiter, None, tag);
                    }
                }
                Piece::Unmap { lba, n_blocks } => self.add_unmap(volume, lba, n_blocks, waiter, tag),
                Piece::Partial { .. } => unreachable!("partials are merged at intake"),
            }
        }
        let w = self.waiters.get(&waiter).expect("waiter");
        if w.remaining == 0 {
            // Nothing to write (e.g. a trim smaller than a block): done at once, or after a sync.
            let w = self.waiters.remove(&waiter).expect("waiter");
            if w.durable {
                self.waiters.insert(waiter, Waiter { max_lsn: Lsn(self.next_lsn.0 - 1), ..w });
                self.sync_waiters.push((Lsn(self.next_lsn.0 - 1), waiter));
            } else {
                w.done.send(Ok(()));
            }
        } else if write_back && self.poisoned.is_none() && self.unwritten_blocks <= WRITE_BACK_MAX_BLOCKS {
            // Write-back: the blocks are in the pending map (reads see them) and in a batch that
            // any later flush waits for, so the answer can go now. Should the log write fail, the
            // engine is poisoned and that flush fails: the client learns it at the flush, where
            // NBD puts the promise.
            let w = self.waiters.get_mut(&waiter).expect("waiter");
            std::mem::replace(&mut w.done, Done::Answered).succeed(false);
            self.stats.write_back_acks += 1;
        }
    }

    /// Ensures an open batch with room for one more block exists; returns false if it cannot (batch
    /// full and not sealable now, or no segment).
    fn ensure_open_batch(&mut self) -> bool {
        if self.open_batch.is_some() {
            if self.batch_room() > 0 {
                return true;
            }
            self.seal_open_batch();
        }
        // Place a new batch at the log head.
        let need = 1 + header_blocks_for(1, 1, 0);
        let (seg, start_block, with_seg_header) = match self.open_seg {
            Some((seg, next)) if next + need <= self.sb.segment_blocks => (seg, next, next == 0),
            _ => {
                if let Some((old, _)) = self.open_seg.take() {
                    self.seal_segment(old);
                }
                let Some(seg) = self.take_free_segment() else {
                    // Admission control keeps a segment for every admitted write; getting here is
                    // a bug, and stopping is the only safe response.
                    self.device_failed(
                        "internal error: no free segment for an admitted write (space accounting)".into(),
                    );
                    return false;
                };
                self.open_seg = Some((seg, 0));
                (seg, 0, true)
            }
        };
        self.batch_no += 1;
        self.open_batch = Some(OpenBatch {
            no: self.batch_no,
            seg,
            start_block,
            with_seg_header,
            entries: Vec::new(),
            crcs: Vec::new(),
            data: Vec::new(),
            waiters: Vec::new(),
            meta: None,
            gc_blocks: 0,
            touched: Vec::new(),
            unmaps: Vec::new(),
        });
        true
    }

    /// Data blocks the open batch can still take (0 if there is no open batch).
    fn batch_room(&self) -> usize {
        let Some(b) = &self.open_batch else { return 0 };
        if b.meta.is_some() {
            return 0;
        }
        let used = b.data.len();
        if used >= MAX_BATCH_BLOCKS as usize {
            return 0;
        }
        let seg_room = self.sb.segment_blocks - b.start_block - b.with_seg_header as u32;
        // Room for one more block with a header big enough for one more entry.
        let need = used as u32 + 1 + header_blocks_for(b.entries.len() + 1, used + 1, 0);
        if need > seg_room {
            return 0;
        }
        (MAX_BATCH_BLOCKS as usize - used).min((seg_room - need + 1) as usize)
    }

    fn add_block(&mut self, volume: VolumeId, lba: u64, data: Bytes, waiter: u64, copy: Option<(u32, Lsn)>, tag: Tag) {
        if !self.ensure_open_batch() {
            // Only reachable after poisoning; the waiter is failed by the poison path.
            return;
        }
        let b = self.open_batch.as_mut().expect("open batch");
        let crc = block_crc(&data);
        let (kind, old_phys, data_lsn) = match copy {
            Some((old_phys, data_lsn)) => (EntryKind::Copy, old_phys, data_lsn),
            None => (EntryKind::Write, 0, Lsn(0)),
        };
        match b.entries.last_mut() {
            Some(e)
                if e.kind == kind
                    && e.volume == volume
                    && e.lba.0 + e.n_blocks as u64 == lba
                    && e.data_lsn == data_lsn
                    && e.tag == tag.seq
                    && e.resync == tag.resync
                    && (kind != EntryKind::Copy || e.old_phys + e.n_blocks == old_phys) =>
            {
                e.n_blocks += 1
            }
            _ => b.entries.push(Entry {
                volume,
                kind,
                lba: Lba(lba),
                n_blocks: 1,
                data_lsn,
                old_phys,
                tag: tag.seq,
                resync: tag.resync,
            }),
        }
        b.crcs.push(crc);
        if copy.is_none() {
            self.unwritten_blocks += 1;
            self.pending.insert((volume, lba), PendingBlock { batch_no: b.no, data: Some(data.clone()) });
            b.touched.push((volume, lba));
            if b.waiters.last() != Some(&waiter) {
                b.waiters.push(waiter);
                self.waiters.get_mut(&waiter).expect("waiter").remaining += 1;
            }
        } else {
            b.gc_blocks += 1;
        }
        b.data.push(data);
    }

    fn add_unmap(&mut self, volume: VolumeId, lba: u64, n_blocks: u64, waiter: u64, tag: Tag) {
        let mut lba = lba;
        let mut left = n_blocks;
        while left > 0 {
            if !self.ensure_open_batch_for_entry() {
                return;
            }
            let b = self.open_batch.as_mut().expect("open batch");
            let n = left.min(u32::MAX as u64 / 2);
            b.entries.push(Entry {
                volume,
                kind: EntryKind::Trim,
                lba: Lba(lba),
                n_blocks: n as u32,
                data_lsn: Lsn(0),
                old_phys: 0,
                tag: tag.seq,
                resync: tag.resync,
            });
            b.unmaps.push((volume, lba, lba + n));
            self.pending_unmaps.push((b.no, volume, lba, lba + n));
            // Blocks pending in earlier batches are superseded by this unmap.
            for l in lba..lba + n.min(1 << 16) {
                if let Some(p) = self.pending.get_mut(&(volume, l)) {
                    p.data = None;
                    p.batch_no = b.no;
                    b.touched.push((volume, l));
                }
            }
            if n >= 1 << 16 {
                let no = b.no;
                let mut retag = Vec::new();
                for ((v, l), p) in self.pending.iter_mut() {
                    if *v == volume && (lba..lba + n).contains(l) {
                        p.data = None;
                        p.batch_no = no;
                        retag.push((*v, *l));
                    }
                }
                self.open_batch.as_mut().expect("open batch").touched.extend(retag);
            }
            let b = self.open_batch.as_mut().expect("open batch");
            if b.waiters.last() != Some(&waiter) {
                b.waiters.push(waiter);
                self.waiters.get_mut(&waiter).expect("waiter").remaining += 1;
            }
            lba += n;
            left -= n;
        }
    }

    /// Like `ensure_open_batch` but for an entry without data.
    fn ensure_open_batch_for_entry(&mut self) -> bool {
        if let Some(b) = &self.open_batch {
            let seg_room = self.sb.segment_blocks - b.start_block - b.with_seg_header as u32;
            let need = b.data.len() as u32 + header_blocks_for(b.entries.len() + 1, b.data.len(), 0);
            if b.meta.is_none() && need <= seg_room && b.entries.len() < MAX_BATCH_BLOCKS as usize {
                return true;
            }
            self.seal_open_batch();
        }
        self.ensure_open_batch()
    }

    fn close_open_batch_for_flush(&mut self, waiter: u64) {
        self.commit_loop.note_flush();
        self.seal_open_batch();
        let through = Lsn(self.next_lsn.0 - 1);
        if self.unsubmitted.back().is_some_and(|u| u.0 == through) {
            if let Some(b) = self.batches.get_mut(&through) {
                b.want_durable = true;
            }
        }
        let w = self.waiters.get_mut(&waiter).expect("waiter");
        w.max_lsn = through;
        self.sync_waiters.push((through, waiter));
    }

    fn create_volume(&mut self, name: String, size_bytes: u64, reply: Reply<VolumeInfo>) {
        let r = self.check_meta().and_then(|()| {
            check_name(&name)?;
            check_size(size_bytes)?;
            if self.state.volumes.values().any(|v| v.name == name) {
                return Err(Error::VolumeExists(name.clone()));
            }
            if self.state.volumes.len() >= MAX_VOLUMES {
                return Err(Error::TooManyVolumes { limit: MAX_VOLUMES });
            }
            Ok(())
        });
        if let Err(e) = r {
            let _ = reply.send(Err(e));
            return;
        }
        let volume = VolumeId(self.state.next_volume_id);
        let info = VolumeInfo {
            id: volume,
            name: name.clone(),
            size_bytes,
            mapped_bytes: 0,
            last_tag: 0,
            trim_floor: u64::MAX,
            attr: Vec::new(),
            staged_blocks: 0,
            resync_overflowed: false,
        };
        self.meta_op(MetaOp::Create { volume, size_bytes, name }, Done::Volume(reply, info));
    }

    /// Applies a volume-table change in memory now and logs it as a record of its own, sealed at
    /// once so that it takes its place in LSN order; the reply waits until the record is durable.
    fn meta_op(&mut self, op: MetaOp, done: Done) {
        // A meta record needs a block or two; refuse cleanly rather than run out mid-way.
        let open_room = self.open_seg.map_or(0, |(_, next)| self.sb.segment_blocks - next);
        if self.n_free == 0 && open_room < 3 + self.open_batch.as_ref().map_or(0, |b| b.data.len() as u32 + 3) {
            done.send(Err(Error::NoSpace));
            return;
        }
        let mut dead = Vec::new();
        self.state.apply_meta(&op, |s| dead.push(s));
        if let MetaOp::Delete { volume } | MetaOp::Resize { volume, .. } = &op {
            let limit = match &op {
                MetaOp::Resize { size_bytes, .. } => size_bytes / BB,
                _ => 0,
            };
            let volume = *volume;
            self.pending.retain(|(v, l), _| !(*v == volume && *l >= limit));
        }
        let waiter = self.add_waiter(1, true, done);
        self.seal_open_batch();
        if !self.ensure_open_batch() {
            return;
        }
        let b = self.open_batch.as_mut().expect("open batch");
        b.meta = Some(op);
        b.waiters.push(waiter);
        // Segments emptied by this change may be reused only once its record is durable, so they
        // are examined after it has its LSN.
        self.seal_open_batch();
        dead.sort_unstable();
        dead.dedup();
        for s in dead {
            self.check_segment_empty(s as u32);
        }
    }
}

enum CurrentBlock {
    Known(Bytes),
    OnDisk { phys: u32, crc: u32 },
}

impl Core {
    fn current_block(&self, volume: VolumeId, lba: u64) -> CurrentBlock {
        if let Some(p) = self.pending.get(&(volume, lba)) {
            return CurrentBlock::Known(p.data.clone().unwrap_or_else(|| Bytes::from_static(&ZERO_BLOCK)));
        }
        if self.pending_unmaps.iter().any(|(_, v, s, e)| *v == volume && (*s..*e).contains(&lba)) {
            return CurrentBlock::Known(Bytes::from_static(&ZERO_BLOCK));
        }
        let entry = self.state.volumes.get(&volume).map(|v| v.effective(lba)).unwrap_or(0);
        match phys_of(entry) {
            Some(phys) => CurrentBlock::OnDisk { phys, crc: crc_of(entry) },
            None => CurrentBlock::Known(Bytes::from_static(&ZERO_BLOCK)),
        }
    }
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name.bytes().all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c));
    if ok {
        Ok(())
    } else {
        Err(Error::BadVolumeName(name.to_string()))
    }
}

fn check_size(size_bytes: u64) -> Result<()> {
    if size_bytes == 0 || size_bytes % BB != 0 {
        return Err(Error::InvalidArgument(format!("volume size {size_bytes} must be a non-zero multiple of 4096")));
    }
    // LBAs are u64 but the trim entry arithmetic and index root vector want sane sizes: 1 PiB.
    if size_bytes > 1 << 50 {
        return Err(Error::InvalidArgument(format!("volume size {size_bytes} exceeds the 1 PiB limit")));
    }
    Ok(())
}

/// Splits a byte-granular write into whole-block data and partial-block pieces.
fn split_write(offset: u64, data: Bytes) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut off = offset;
    let mut rest = data;
    while !rest.is_empty() {
        let lba = off / BB;
        let at = (off % BB) as usize;
        if at != 0 || rest.len() < BLOCK_BYTES {
            let n = (BLOCK_BYTES - at).min(rest.len());
            pieces.push(Piece::Partial { lba, at, data: rest.split_to(n) });
            off += n as u64;
        } else {
            let n = rest.len() / BLOCK_BYTES * BLOCK_BYTES;
            pieces.push(Piece::Data { lba, data: rest.split_to(n) });
            off += n as u64;
        }
    }
    pieces
}

fn split_zeroes(offset: u64, len: u64, may_trim: bool) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let end = offset + len;
    let first_whole = offset.div_ceil(BB);
    let end_whole = end / BB;
    if first_whole > end_whole {
        // Inside one block.
        pieces.push(Piece::Partial { lba: offset / BB, at: (offset % BB) as usize, data: zeros(len as usize) });
        return pieces;
    }
    if offset % BB != 0 {
        let n = (first_whole * BB - offset) as usize;
        pieces.push(Piece::Partial { lba: offset / BB, at: (offset % BB) as usize, data: zeros(n) });
    }
    if end_whole > first_whole {
        let n_blocks = end_whole - first_whole;
        pieces.push(if may_trim {
            Piece::Unmap { lba: first_whole, n_blocks }
        } else {
            Piece::Zero { lba: first_whole, n_blocks }
        });
    }
    if end % BB != 0 {
        pieces.push(Piece::Partial { lba: end_whole, at: 0, data: zeros((end % BB) as usize) });
    }
    pieces
}

fn zeros(n: usize) -> Bytes {
    Bytes::from_static(&ZERO_BLOCK[..n])
}

// ---------------------------------------------------------------------------------------------
// Sealing, space, submission.

impl Core {
    /// Gives the open batch its LSN and its bytes. Always possible: the place in the log was
    /// reserved when the batch was opened. Submission may come later (see `seal_and_submit`).
    fn seal_open_batch(&mut self) {
        let Some(b) = self.open_batch.take() else { return };
        if b.entries.is_empty() && b.meta.is_none() {
            return;
        }
        let lsn = self.next_lsn;
        self.next_lsn = lsn.next();
        let mut entries = b.entries;
        for e in &mut entries {
            if e.kind != EntryKind::Copy {
                e.data_lsn = lsn;
            }
        }
        let seg_seq = self.segs[b.seg as usize].seq;
        let (kind, meta_bytes) = match &b.meta {
            Some(op) => (RecordKind::Meta, op.encode()),
            None => (RecordKind::Data, Vec::new()),
        };
        let header = RecordHeader {
            kind,
            lsn,
            durable_lsn: self.durable_lsn,
            segment_seq: seg_seq,
            entries,
            crcs: b.crcs,
            meta: meta_bytes,
        };
        let hb = header.header_blocks();
        let sh = b.with_seg_header as u32;
        let n_data = b.data.len() as u32;
        let total = sh + hb + n_data;
        assert!(b.start_block + total <= self.sb.segment_blocks, "batch overflows its segment");
        let store_id = self.sb.store_id;
        let buf = AlignedBuf::assemble(
            (sh + hb) as usize,
            |head| {
                if b.with_seg_header {
                    SegmentHeader { store_id, seq: seg_seq, segment: b.seg, first_lsn: lsn }
                        .encode_into(&mut head[..BLOCK_BYTES]);
                }
                header.encode_into(&mut head[sh as usize * BLOCK_BYTES..], store_id);
            },
            b.data.iter().map(|d| &d[..]),
        );
        debug_assert_eq!(buf.n_blocks(), total as usize);
        // Checksums are computed at intake; check them once more right before the bytes leave.
        debug_assert!(b.data.iter().zip(&header.crcs).all(|(d, c)| block_crc(d) == *c));
        let seg = &mut self.segs[b.seg as usize];
        seg.note_trims(&header.entries);
        seg.used_blocks = b.start_block + total;
        seg.inflight_batches += 1;
        seg.max_lsn = lsn.0;
        for e in &header.entries {
            if e.kind.has_data() {
                seg.min_data_lsn =
                    if seg.min_data_lsn == 0 { e.data_lsn.0 } else { seg.min_data_lsn.min(e.data_lsn.0) };
                seg.max_data_lsn = seg.max_data_lsn.max(e.data_lsn.0);
            }
        }
        self.open_seg = Some((b.seg, b.start_block + total));
        let first_data_phys = self.phys(b.seg, b.start_block + sh + hb);
        self.stats.log_blocks_written += total as u64;
        self.stats.user_blocks_written += (b.data.len() - b.gc_blocks) as u64;
        self.stats.gc_blocks_copied += b.gc_blocks as u64;
        self.stats.batches += 1;
        let user_blocks = (b.data.len() - b.gc_blocks) as u64;
        for w in &b.waiters {
            if let Some(w) = self.waiters.get_mut(w) {
                w.max_lsn = w.max_lsn.max(lsn);
            }
        }
        let gc_victim = match &self.gc {
            Gc::Copying { seg, .. } if b.gc_blocks > 0 => Some((*seg, b.gc_blocks)),
            _ => None,
        };
        let offset = self.seg_offset_bytes(b.seg, b.start_block);
        let want_durable =
            b.meta.is_some() || b.waiters.iter().any(|id| self.waiters.get(id).is_some_and(|w| w.durable));
        if !b.waiters.is_empty() {
            self.commit_loop.note_write();
        }
        self.batches.insert(
            lsn,
            Batch {
                no: b.no,
                seg: b.seg,
                first_data_phys,
                kind,
                entries: header.entries,
                crcs: header.crcs,
                waiters: b.waiters,
                touched: b.touched,
                unmaps: b.unmaps,
                completed: false,
                gc_victim,
                want_durable,
                durable_write: false,
                user_blocks,
            },
        );
        self.unsubmitted.push_back((lsn, offset, buf));
    }

    fn seal_segment(&mut self, seg: u32) {
        let st = &self.segs[seg as usize];
        if st.status != SegStatus::Open {
            return;
        }
        if st.used_blocks == 0 {
            self.set_status(seg, SegStatus::Free);
            return;
        }
        self.set_status(seg, SegStatus::Sealed);
        self.check_segment_empty(seg);
    }

    fn take_free_segment(&mut self) -> Option<u32> {
        // Lowest-numbered free segment: deterministic, and keeps a fresh store's writes near the
        // start of the device.
        let seg = self.segs.iter().position(|s| s.status == SegStatus::Free)? as u32;
        self.set_status(seg, SegStatus::Open);
        let st = &mut self.segs[seg as usize];
        st.seq = self.next_seg_seq;
        st.used_blocks = 0;
        st.min_data_lsn = 0;
        st.max_data_lsn = 0;
        st.max_lsn = 0;
        st.gc_skip = false;
        st.gc_leftover = false;
        st.trim_tags.clear();
        self.next_seg_seq += 1;
        Some(seg)
    }

    /// Whether a write of `n_blocks` data blocks may proceed without eating into the cleaner's
    /// reserve. Counts headers pessimistically.
    fn space_for_user(&self, n_blocks: u64) -> bool {
        let seg_blocks = self.sb.segment_blocks as u64;
        let open_room = match (self.open_seg, &self.open_batch) {
            (Some((_, next)), Some(b)) => {
                let used = b.start_block as u64
                    + b.with_seg_header as u64
                    + b.data.len() as u64
                    + header_blocks_for(b.entries.len(), b.data.len(), 0) as u64;
                seg_blocks.saturating_sub(used.max(next as u64))
            }
            (Some((_, next)), None) => seg_blocks - next as u64,
            _ => 0,
        };
        let free = self.free_segments() as u64;
        if n_blocks == 0 {
            // A trim only frees space. Its record (a header block or two) may use the cleaner's
            // reserve: otherwise a store filled to the brim with live data could never be emptied.
            return open_room >= 3 || free > 0;
        }
        let usable = free.saturating_sub(self.cfg.gc_reserve_segments as u64) * (seg_blocks - 1);
        let need = n_blocks + 8 + n_blocks / 32;
        open_room + usable >= need
    }

    /// Whether waiting for the cleaner can produce free space.
    fn gc_can_help(&self) -> bool {
        if self.poisoned.is_some() {
            return false;
        }
        if !matches!(self.gc, Gc::Idle) || !matches!(self.ckpt, CkptPhase::Idle) {
            return true;
        }
        self.segs.iter().enumerate().any(|(i, s)| match s.status {
            SegStatus::PendingFree => true,
            SegStatus::Sealed => !s.gc_skip && !s.gc_leftover && self.victim_gain(i) > 0 && !self.pinned(i as u32),
            _ => false,
        })
    }

    /// Net blocks gained by cleaning segment `i`, or <= 0 if it is not worth cleaning. Copying
    /// costs the live blocks plus record headers, so a victim must be at least 1/8 dead (plus two
    /// blocks of slack for headers): otherwise the cleaner could spin, copying as much as it frees.
    fn victim_gain(&self, i: usize) -> i64 {
        let seg_blocks = self.sb.segment_blocks as i64;
        let live = self.state.live[i] as i64;
        let dead = seg_blocks - live;
        if dead < seg_blocks / 8 + 2 {
            return 0;
        }
        dead - (live / 128 + 2)
    }

    /// Whether the segment holds trim entries that a replicated volume still needs for a resync
    /// (tag above the volume's trim floor): then it is neither cleaned nor reused.
    fn pinned(&self, seg: u32) -> bool {
        self.segs[seg as usize].trim_tags.iter().any(|&(v, tag)| {
            if v == ANY_VOLUME {
                self.state.volumes.values().any(|vol| tag > vol.trim_floor)
            } else {
                self.state.volumes.get(&VolumeId(v)).is_some_and(|vol| tag > vol.trim_floor)
            }
        })
    }

    /// Moves an empty, settled segment towards reuse. Called whenever a segment loses a block, which
    /// also makes a cleaned segment with leftovers a candidate again.
    fn check_segment_empty(&mut self, seg: u32) {
        self.segs[seg as usize].gc_leftover = false;
        let last = Lsn(self.next_lsn.0 - 1);
        let st = &self.segs[seg as usize];
        if matches!(st.status, SegStatus::Sealed)
            && st.inflight_batches == 0
            && self.state.live[seg as usize] == 0
            && !self.pinned(seg)
        {
            self.set_status(seg, SegStatus::PendingFree);
            self.segs[seg as usize].free_after_lsn = last;
        }
    }

    /// Highest LSN such that every batch up to it has completed.
    fn completed_through(&self) -> Lsn {
        match self.batches.keys().next() {
            Some(first) => Lsn(first.0 - 1),
            None => Lsn(self.next_lsn.0 - 1),
        }
    }

    fn draining_io(&self) -> bool {
        matches!(self.ckpt, CkptPhase::Draining) && matches!(self.gc, Gc::Idle | Gc::Reading)
    }

    fn seal_and_submit(&mut self) {
        if self.poisoned.is_some() {
            return;
        }
        let in_flight = self.batches.len() - self.unsubmitted.len();
        if in_flight < self.cfg.max_inflight_batches && !self.draining_io() {
            self.feed_gc_copies();
            if self.unsubmitted.is_empty() {
                self.seal_open_batch();
            }
        }
        self.submit_batches();
    }

    /// Hands sealed batches to the device, up to the in-flight limit.
    ///
    /// A batch that every earlier batch precedes on stable storage (`durable_lsn` is just below it)
    /// and that someone will wait to be durable is written durably (FUA): its completion then makes
    /// it durable without an fdatasync, which saves a device round trip and the sync's wake-up.
    /// "Will wait" is known for FUA writes, volume changes and batches a flush sealed; for the
    /// common database pattern of one write then one flush, it is predicted (see [`CommitLoop`]).
    ///
    /// Batches of at least [`BIG_BATCH_BLOCKS`] may go beyond `max_inflight_batches`, up to twice
    /// it: they come from large writes, which are limited by the device's bandwidth, not helped by
    /// waiting to share a batch, and a virtio disk needs more than four 1 MiB writes in flight to
    /// reach its sequential bandwidth (measured: 1.95 GB/s through NBD with four, 2.2–2.3 with
    /// eight, against 2.2–2.4 for fio on the same disk at that moment).
    fn submit_batches(&mut self) {
        let mut in_flight = self.batches.len() - self.unsubmitted.len();
        while let Some((_, _, next)) = self.unsubmitted.front() {
            let limit = if next.n_blocks() >= BIG_BATCH_BLOCKS {
                2 * self.cfg.max_inflight_batches
            } else {
                self.cfg.max_inflight_batches
            };
            if in_flight >= limit {
                break;
            }
            let Some((lsn, offset, buf)) = self.unsubmitted.pop_front() else { break };
            let predicted = self.commit_loop.flush_expected();
            let mut durable = false;
            if let Some(b) = self.batches.get_mut(&lsn) {
                durable = self.durable_lsn.next() == lsn && (b.want_durable || predicted);
                b.durable_write = durable;
            }
            self.submit(Token::Batch(lsn), IoKind::Write { offset, buf, durable });
            in_flight += 1;
        }
    }

    // -----------------------------------------------------------------------------------------
    // Completions.

    pub fn on_completion(&mut self, c: Completion) {
        let Some(token) = self.tokens.remove(&c.token) else {
            tracing::error!("completion for unknown token {}", c.token);
            return;
        };
        match token {
            Token::Batch(lsn) => {
                if let Err(e) = c.result {
                    self.poison(format!("log write of LSN {lsn} failed: {e}"));
                    self.fail_everything();
                    return;
                }
                if let Some(b) = self.batches.get_mut(&lsn) {
                    b.completed = true;
                    if b.durable_write && self.durable_lsn.next() == lsn {
                        self.durable_lsn = lsn;
                        self.stats.durable_writes += 1;
                    }
                }
                self.apply_completed();
            }
            Token::Sync { through } => {
                self.sync_in_flight = false;
                if let Err(e) = c.result {
                    self.poison(format!("fdatasync failed: {e}"));
                    self.fail_everything();
                    return;
                }
                self.stats.syncs += 1;
                self.durable_lsn = self.durable_lsn.max(through);
                if let CkptPhase::SyncAfter { header } = &self.ckpt {
                    if self.ckpt_sync_after_token == Some(c.token) {
                        let header = *header;
                        self.checkpoint_done(header);
                    }
                }
                self.reply_synced();
            }
            Token::Read { read_id, block_idx, n_blocks, seg, crcs, phys } => {
                self.release_reader(seg);
                let result = c
                    .result
                    .map_err(|e| Error::io(format!("read at device offset {}", self.phys_offset_bytes(phys)), e));
                let buf = c.buf;
                let mut error = None;
                let mut direct = None;
                match (result, buf) {
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
                            if let Some(w) = self.reads.get_mut(&read_id) {
                                match &mut w.buf {
                                    Some(b) => b[block_idx * BLOCK_BYTES..(block_idx + n_blocks) * BLOCK_BYTES]
                                        .copy_from_slice(&buf),
                                    None => direct = Some(buf),
                                }
                            }
                        }
                    }
                    (Err(e), _) => error = Some(e),
                    (Ok(()), None) => error = Some(Error::InvalidArgument("read returned no buffer".into())),
                }
                let Some(w) = self.reads.get_mut(&read_id) else { return };
                if w.error.is_none() {
                    w.error = error;
                }
                w.remaining -= 1;
                if w.remaining == 0 {
                    let w = self.reads.remove(&read_id).expect("read waiter");
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
            Token::RmwRead { lba, seg, crc, phys } => {
                self.release_reader(seg);
                let block = match (c.result, c.buf) {
                    (Ok(()), Some(buf)) if block_crc(&buf) == crc => Ok(Bytes::copy_from_slice(&buf)),
                    (Ok(()), Some(buf)) => Err(self.corrupt_error(
                        seg,
                        phys,
                        format!("block checksum {:#010x}, expected {crc:#010x}", block_crc(&buf)),
                    )),
                    (Err(e), _) => Err(Error::io(format!("read at device offset {}", self.phys_offset_bytes(phys)), e)),
                    (Ok(()), None) => Err(Error::InvalidArgument("read returned no buffer".into())),
                };
                let Some(Stall::Rmw { bases, outstanding, error, .. }) = &mut self.stall else {
                    unreachable!("RMW read without a stalled write")
                };
                match block {
                    Ok(b) => {
                        bases.insert(lba, b);
                    }
                    Err(e) => *error = Some(e),
                }
                *outstanding -= 1;
                if *outstanding == 0 {
                    let Some(Stall::Rmw { op, bases, error, .. }) = self.stall.take() else { unreachable!() };
                    match error {
                        Some(e) => op.done.send(Err(e)),
                        None => self.finish_intake(op, bases),
                    }
                }
            }
            Token::GcRead { seg } => {
                self.release_reader(seg);
                match (c.result, c.buf) {
                    (Ok(()), Some(buf)) => self.gc_parse_victim(seg, buf),
                    (r, _) => {
                        tracing::error!("cleaner could not read segment {seg}: {:?}", r.err());
                        self.set_status(seg, SegStatus::Sealed);
                        self.segs[seg as usize].gc_skip = true;
                        self.gc = Gc::Idle;
                    }
                }
            }
            Token::ScanRead { seg } => {
                self.release_reader(seg);
                self.scan_busy = false;
                match (c.result, c.buf) {
                    (Ok(()), Some(buf)) => self.scan_segment(seg, &buf),
                    (r, _) => {
                        if let Some(scan) = self.scans.pop_front() {
                            let _ = scan.reply.send(Err(Error::io(
                                format!("reading segment {seg}"),
                                r.err().unwrap_or_else(|| std::io::Error::other("no buffer")),
                            )));
                        }
                    }
                }
            }
            Token::CheckpointWrite => {
                if let Err(e) = c.result {
                    self.poison(format!("checkpoint write failed: {e}"));
                    self.fail_everything();
                    return;
                }
                let CkptPhase::Writing { header } = &self.ckpt else { unreachable!("checkpoint write completion") };
                self.ckpt = CkptPhase::SyncAfter { header: *header };
                self.ckpt_sync_after_token = None;
            }
        }
    }

    /// Applies completed batches in LSN order and acknowledges their writers.
    fn apply_completed(&mut self) {
        while let Some(entry) = self.batches.first_entry() {
            if !entry.get().completed {
                break;
            }
            let b = entry.remove();
            self.unwritten_blocks -= b.user_blocks;
            let mut dead = Vec::new();
            if b.kind == RecordKind::Data {
                self.state.apply_data(&b.entries, &b.crcs, b.first_data_phys, |s| dead.push(s));
            }
            for key in &b.touched {
                if self.pending.get(key).is_some_and(|p| p.batch_no == b.no) {
                    self.pending.remove(key);
                }
            }
            if !b.unmaps.is_empty() {
                self.pending_unmaps.retain(|u| u.0 != b.no);
            }
            if let (Some((victim, n)), Gc::Copying { seg, in_flight, .. }) = (b.gc_victim, &mut self.gc) {
                if *seg == victim {
                    *in_flight -= n;
                }
            }
            self.segs[b.seg as usize].inflight_batches -= 1;
            dead.push(b.seg as usize);
            dead.sort_unstable();
            dead.dedup();
            for s in dead {
                self.check_segment_empty(s as u32);
            }
            for id in b.waiters {
                let Some(w) = self.waiters.get_mut(&id) else { continue };
                w.remaining -= 1;
                if w.remaining > 0 {
                    continue;
                }
                if w.durable {
                    let through = w.max_lsn;
                    self.sync_waiters.push((through, id));
                } else {
                    let w = self.waiters.remove(&id).expect("waiter");
                    w.done.succeed(w.max_lsn <= self.durable_lsn);
                }
            }
        }
    }

    fn reply_synced(&mut self) {
        let durable = self.durable_lsn;
        let mut i = 0;
        while i < self.sync_waiters.len() {
            let (through, id) = self.sync_waiters[i];
            if through <= durable {
                self.sync_waiters.swap_remove(i);
                if let Some(w) = self.waiters.remove(&id) {
                    w.done.succeed(true);
                }
            } else {
                i += 1;
            }
        }
    }

    /// After a failed write or sync: fail every waiting writer and drop unapplied batches. Reads of
    /// applied data keep working; the index never saw the failed batches.
    fn fail_everything(&mut self) {
        let cause = self.poisoned.clone().unwrap_or_default();
        for (_, w) in std::mem::take(&mut self.waiters) {
            w.done.send(Err(Error::Poisoned { cause: cause.clone() }));
        }
        self.sync_waiters.clear();
        self.batches.clear();
        self.unsubmitted.clear();
        self.open_batch = None;
        self.unwritten_blocks = 0;
        self.pending.clear();
        self.pending_unmaps.clear();
        for r in self.ckpt_waiters.drain(..) {
            let _ = r.send(Err(Error::Poisoned { cause: cause.clone() }));
        }
        self.ckpt = CkptPhase::Idle;
        self.ckpt_wanted = false;
        if let Some(Stall::Space { op, .. }) = self.stall.take() {
            op.done.send(Err(Error::Poisoned { cause: cause.clone() }));
        }
        self.gc = Gc::Idle;
    }

    // -----------------------------------------------------------------------------------------
    // Syncs.

    fn step_syncs(&mut self) {
        if self.sync_in_flight || self.poisoned.is_some() {
            return;
        }
        let completed = self.completed_through();
        let mut want = false;
        if self.sync_waiters.iter().any(|(t, _)| *t > self.durable_lsn && *t <= completed) {
            want = true;
        }
        // Segments waiting to be freed need a sync of what superseded their data, but only once
        // free space matters: until then the syncs that flushes and checkpoints issue anyway free
        // them, and a writer that never flushes (a sequential copy) is not slowed by a device
        // cache flush per segment it overwrites (one per 8 MiB: 160 a second at 1.3 GB/s, which
        // cost a third of the throughput of 1 MiB writes on a virtio disk). The margin is twice
        // the cleaner's threshold, so these frees come before the cleaner would start copying.
        if self.n_pending_free > 0
            && (self.free_segments() < 2 * self.gc_low_segments() || self.low_on_space())
            && self.segs.iter().any(|s| {
                s.status == SegStatus::PendingFree
                    && s.free_after_lsn > self.durable_lsn
                    && s.free_after_lsn <= completed
            })
        {
            want = true;
        }
        if let CkptPhase::SyncBefore { through, .. } = &self.ckpt {
            if *through > self.durable_lsn {
                want = true;
            }
        }
        let ckpt_after = matches!(self.ckpt, CkptPhase::SyncAfter { .. }) && self.ckpt_sync_after_token.is_none();
        if want || ckpt_after {
            let token = self.next_token;
            self.submit(Token::Sync { through: completed }, IoKind::Sync);
            self.sync_in_flight = true;
            if ckpt_after {
                self.ckpt_sync_after_token = Some(token);
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Checkpoints.

    fn step_checkpoint(&mut self) {
        if self.poisoned.is_some() {
            return;
        }
        let log_since = self.stats.log_blocks_written - self.log_blocks_at_ckpt;
        let interval_blocks = (self.cfg.checkpoint_interval_bytes / BB)
            .min(self.sb.n_segments as u64 * self.sb.segment_blocks as u64 / 4)
            .max(1);
        if log_since >= interval_blocks {
            self.ckpt_wanted = true;
        }
        match &mut self.ckpt {
            CkptPhase::Idle => {
                if self.ckpt_wanted {
                    self.ckpt_wanted = false;
                    self.ckpt = CkptPhase::Draining;
                    self.ckpt_in_progress_waiters = std::mem::take(&mut self.ckpt_waiters);
                }
            }
            CkptPhase::Draining => {
                // A write held in a read-modify-write stall has not entered a batch: it does not
                // block the snapshot.
                if self.draining_io() && self.batches.is_empty() {
                    self.take_snapshot();
                }
            }
            CkptPhase::SyncBefore { through, header, buf } => {
                if self.durable_lsn >= *through {
                    let header = *header;
                    let buf = buf.take().expect("checkpoint buffer");
                    let offset = self.sb.checkpoint_offsets[(header.seq % 2) as usize];
                    self.ckpt = CkptPhase::Writing { header };
                    self.submit(Token::CheckpointWrite, IoKind::Write { offset, buf, durable: false });
                }
            }
            CkptPhase::Writing { .. } | CkptPhase::SyncAfter { .. } => {}
        }
    }

    fn take_snapshot(&mut self) {
        let mut data = CheckpointData {
            next_volume_id: self.state.next_volume_id,
            volumes: Vec::with_capacity(self.state.volumes.len()),
            segments: Vec::with_capacity(self.segs.len()),
            runs: Vec::new(),
            entries: Vec::new(),
        };
        for v in self.state.volumes.values() {
            data.volumes.push(VolumeRec {
                id: v.id.0,
                name: v.name.clone(),
                size_bytes: v.size_bytes,
                last_tag: v.last_tag,
                trim_floor: v.trim_floor,
                attr: v.attr.clone(),
                staged: v.staged.writes.iter().map(|(l, p)| (*l, *p)).collect(),
                staged_trims: v.staged.trims.clone(),
                resync_overflowed: v.staged.overflowed,
            });
            let mut run: Option<RunRec> = None;
            let runs = &mut data.runs;
            let entries = &mut data.entries;
            v.index.for_each_in(0, u64::MAX, |lba, e| {
                match &mut run {
                    Some(r) if r.lba + r.n_blocks as u64 == lba && r.n_blocks < u32::MAX => r.n_blocks += 1,
                    _ => {
                        if let Some(r) = run.take() {
                            runs.push(r);
                        }
                        run = Some(RunRec { volume: v.id.0, n_blocks: 1, lba });
                    }
                }
                entries.push(e);
            });
            if let Some(r) = run {
                data.runs.push(r);
            }
        }
        for s in &self.segs {
            // Segments on their way to reuse are recorded as empty.
            let used = match s.status {
                SegStatus::Free => 0,
                _ => s.used_blocks,
            };
            data.segments.push(SegmentRec {
                seq: s.seq,
                used_blocks: used,
                min_data_lsn: s.min_data_lsn,
                max_data_lsn: s.max_data_lsn,
                max_lsn: s.max_lsn,
                trim_tags: s.trim_tags.clone(),
            });
        }
        let payload = data.to_bytes();
        let (tail_segment, tail_block, tail_seq) = match self.open_seg {
            Some((seg, next)) => (seg, next, self.segs[seg as usize].seq),
            None => (u32::MAX, 0, 0),
        };
        let header = CheckpointHeader {
            store_id: self.sb.store_id,
            seq: self.ckpt_seq + 1,
            next_lsn: self.next_lsn,
            next_segment_seq: self.next_seg_seq,
            tail_segment,
            tail_block,
            tail_seq,
            payload_bytes: payload.len() as u64,
            payload_crc: crc32fast::hash(&payload),
        };
        let n_blocks = 1 + payload.len().div_ceil(BLOCK_BYTES);
        if n_blocks as u64 > self.sb.checkpoint_slot_blocks {
            self.poison(format!(
                "checkpoint of {} bytes does not fit its slot of {} blocks (internal sizing error)",
                payload.len(),
                self.sb.checkpoint_slot_blocks
            ));
            self.fail_everything();
            return;
        }
        let mut buf = AlignedBuf::zeroed(n_blocks);
        buf.block_mut(0).copy_from_slice(&header.encode());
        buf[BLOCK_BYTES..BLOCK_BYTES + payload.len()].copy_from_slice(&payload);
        self.stats.checkpoint_bytes_last = (n_blocks * BLOCK_BYTES) as u64;
        self.log_blocks_at_ckpt = self.stats.log_blocks_written;
        let through = Lsn(self.next_lsn.0 - 1);
        self.ckpt = CkptPhase::SyncBefore { through, header, buf: Some(buf) };
        tracing::debug!("checkpoint {} snapshot at LSN {}", header.seq, through);
    }

    fn checkpoint_done(&mut self, header: CheckpointHeader) {
        self.ckpt_seq = header.seq;
        // The tail segment still receives records replayed from this checkpoint: it must not be
        // reused before the next one.
        self.reuse_below_seq = if header.tail_segment == u32::MAX { header.next_segment_seq } else { header.tail_seq };
        self.stats.checkpoints += 1;
        self.ckpt = CkptPhase::Idle;
        for r in self.ckpt_in_progress_waiters.drain(..) {
            let _ = r.send(Ok(()));
        }
        tracing::debug!("checkpoint {} durable", header.seq);
    }

    // -----------------------------------------------------------------------------------------
    // Segment reuse.

    fn release_reader(&mut self, seg: u32) {
        self.segs[seg as usize].readers -= 1;
        self.free_scan_key = None;
    }

    fn step_free(&mut self) {
        if self.n_pending_free == 0 {
            return;
        }
        // The scan visits every segment; skip it while nothing it depends on has changed (a
        // segment waiting for a sync can stay pending for many requests).
        let key = (
            self.durable_lsn,
            self.reuse_below_seq,
            self.n_pending_free,
            self.low_on_space(),
            matches!(self.ckpt, CkptPhase::Idle),
        );
        if self.free_scan_key == Some(key) {
            return;
        }
        self.free_scan_key = Some(key);
        let durable = self.durable_lsn;
        let below = self.reuse_below_seq;
        let mut blocked_on_ckpt = false;
        for i in 0..self.segs.len() {
            let s = &self.segs[i];
            if s.status != SegStatus::PendingFree {
                continue;
            }
            if s.free_after_lsn <= durable && s.readers == 0 {
                if s.seq < below {
                    self.set_status(i as u32, SegStatus::Free);
                    self.segs[i].used_blocks = 0;
                } else {
                    blocked_on_ckpt = true;
                }
            }
        }
        if blocked_on_ckpt && self.low_on_space() && matches!(self.ckpt, CkptPhase::Idle) {
            self.ckpt_wanted = true;
        }
    }

    fn gc_low_segments(&self) -> usize {
        self.cfg.gc_reserve_segments as usize + 2 + self.sb.n_segments as usize / 64
    }

    fn low_on_space(&self) -> bool {
        self.free_segments() < self.gc_low_segments() || matches!(self.stall, Some(Stall::Space { .. }))
    }

    // -----------------------------------------------------------------------------------------
    // Cleaner.

    fn step_gc(&mut self) {
        // Until the checkpoint that ends recovery is durable, the segments of the old checkpoint's
        // log (some of them now empty) are still what a crash would replay: nothing may be copied
        // into them.
        if self.poisoned.is_some() || self.ckpt_seq == self.recovered_from_ckpt_seq {
            return;
        }
        if let Gc::Copying { seg, queued, in_flight } = &self.gc {
            if queued.is_empty() && *in_flight == 0 {
                let seg = *seg;
                self.set_status(seg, SegStatus::Sealed);
                if self.state.live[seg as usize] == 0 {
                    self.stats.segments_cleaned += 1;
                    self.check_segment_empty(seg);
                } else {
                    tracing::debug!(
                        "segment {seg} still has {} live blocks after cleaning; retried once one of them dies",
                        self.state.live[seg as usize]
                    );
                    self.segs[seg as usize].gc_leftover = true;
                }
                self.gc = Gc::Idle;
            }
        }
        if !matches!(self.gc, Gc::Idle) || !matches!(self.ckpt, CkptPhase::Idle) || !self.low_on_space() {
            return;
        }
        // Cost-benefit (Rosenblum & Ousterhout): prefer segments that are empty and old.
        let now = self.next_lsn.0;
        let mut best: Option<(f64, u32)> = None;
        let mut blocked_by_seq = false;
        let room = self.free_segments() as i64 * (self.sb.segment_blocks as i64 - 1);
        for (i, s) in self.segs.iter().enumerate() {
            if s.status != SegStatus::Sealed
                || s.gc_skip
                || s.gc_leftover
                || s.inflight_batches > 0
                || self.victim_gain(i) <= 0
                || self.pinned(i as u32)
            {
                continue;
            }
            let live = self.state.live[i] as i64;
            if live + live / 200 + 8 > room {
                continue;
            }
            if s.seq >= self.reuse_below_seq {
                blocked_by_seq = true;
                continue;
            }
            let u = live as f64 / self.sb.segment_blocks as f64;
            let age = (now.saturating_sub(s.max_lsn) + 1) as f64;
            let score = (1.0 - u) * age / (1.0 + u);
            if best.is_none_or(|(b, _)| score > b) {
                best = Some((score, i as u32));
            }
        }
        let Some((_, seg)) = best else {
            if blocked_by_seq {
                self.ckpt_wanted = true;
            }
            return;
        };
        self.set_status(seg, SegStatus::Victim);
        let st = &mut self.segs[seg as usize];
        st.readers += 1;
        let n = st.used_blocks as usize;
        let offset = self.seg_offset_bytes(seg, 0);
        self.gc = Gc::Reading;
        self.submit(Token::GcRead { seg }, IoKind::Read { offset, buf: AlignedBuf::zeroed(n) });
    }

    fn gc_parse_victim(&mut self, seg: u32, buf: AlignedBuf) {
        let mut copies = VecDeque::new();
        let mut corrupt = None;
        let owner = Bytes::from_owner(buf);
        let parse = walk_data_blocks(&self.sb, seg, &owner, |e, lba, phys, block_idx, crc| {
            let Some(vol) = self.state.volumes.get(&e.volume) else { return true };
            // Live in the index, or staged by an uncommitted resync (then its copy stays staged).
            let staged = vol.staged.writes.get(&lba).copied().filter(|p| phys_of(*p) == Some(phys));
            let entry = staged.unwrap_or_else(|| vol.index.get(lba));
            if phys_of(entry) != Some(phys) {
                return true;
            }
            let data = owner.slice(block_idx * BLOCK_BYTES..(block_idx + 1) * BLOCK_BYTES);
            let got = block_crc(&data);
            if got != crc_of(entry) || got != crc {
                let what = format!("live block checksum {got:#010x}, expected {:#010x}", crc_of(entry));
                corrupt = Some(self.corrupt_error(seg, phys, what));
                return false;
            }
            copies.push_back(GcCopy {
                volume: e.volume,
                tag: Tag { seq: e.tag, resync: staged.is_some() },
                lba,
                old_phys: phys,
                data_lsn: e.data_lsn,
                data,
            });
            true
        });
        if let Some(e) = corrupt {
            tracing::error!("cleaner skips segment {seg}: {e}");
            self.set_status(seg, SegStatus::Sealed);
            self.segs[seg as usize].gc_skip = true;
            self.gc = Gc::Idle;
            return;
        }
        if let Err(why) = parse {
            if copies.len() as u32 != self.state.live[seg as usize] {
                tracing::error!("cleaner cannot parse segment {seg}: {why}");
                self.set_status(seg, SegStatus::Sealed);
                self.segs[seg as usize].gc_skip = true;
                self.gc = Gc::Idle;
                return;
            }
        }
        self.gc = Gc::Copying { seg, queued: copies, in_flight: 0 };
    }

    /// Moves queued cleaner copies into the open batch, bounded per batch.
    fn feed_gc_copies(&mut self) {
        let Gc::Copying { queued, .. } = &mut self.gc else { return };
        if queued.is_empty() {
            return;
        }
        let mut queued = std::mem::take(queued);
        let mut added = 0usize;
        while let Some(c) = queued.front() {
            let still_live = self.state.volumes.get(&c.volume).is_some_and(|v| {
                let at =
                    if c.tag.resync { v.staged.writes.get(&c.lba).copied().unwrap_or(0) } else { v.index.get(c.lba) };
                phys_of(at) == Some(c.old_phys)
            }) && !self.pending.contains_key(&(c.volume, c.lba));
            if !still_live {
                queued.pop_front();
                continue;
            }
            let gc_in_batch = self.open_batch.as_ref().map_or(0, |b| b.gc_blocks);
            if gc_in_batch >= GC_BLOCKS_PER_BATCH_MAX {
                break;
            }
            if !self.ensure_open_batch() {
                break;
            }
            let c = queued.pop_front().expect("front");
            self.add_block(c.volume, c.lba, c.data, 0, Some((c.old_phys, c.data_lsn)), c.tag);
            added += 1;
        }
        if let Gc::Copying { queued: q, in_flight, .. } = &mut self.gc {
            *q = queued;
            *in_flight += added;
        }
    }

    // -----------------------------------------------------------------------------------------
    // Changed-block scans (for replication resync).

    fn step_scans(&mut self) {
        if self.scan_busy {
            return;
        }
        let Some(scan) = self.scans.front_mut() else { return };
        match scan.segs.pop() {
            Some(seg) => {
                let n = self.segs[seg as usize].used_blocks as usize;
                self.segs[seg as usize].readers += 1;
                let offset = self.seg_offset_bytes(seg, 0);
                self.scan_busy = true;
                self.submit(Token::ScanRead { seg }, IoKind::Read { offset, buf: AlignedBuf::zeroed(n) });
            }
            None => {
                let mut scan = self.scans.pop_front().expect("scan");
                scan.found.sort_unstable();
                let mut runs: Vec<ChangedRun> = Vec::new();
                for (first, end) in scan.found {
                    match runs.last_mut() {
                        Some(r) if r.lba.0 + r.n_blocks >= first => {
                            r.n_blocks = r.n_blocks.max(end - r.lba.0);
                        }
                        _ => runs.push(ChangedRun { lba: Lba(first), n_blocks: end - first }),
                    }
                }
                let _ = scan.reply.send(Ok(runs));
            }
        }
    }

    fn scan_segment(&mut self, seg: u32, buf: &[u8]) {
        let Some(scan) = self.scans.front() else { return };
        let (volume, since) = (scan.volume, scan.since);
        let Some(vol) = self.state.volumes.get(&volume) else { return };
        let n_blocks = vol.n_blocks();
        let mut found = Vec::new();
        // A segment still being written ends in blocks that are not records yet; what parsed
        // before them is all that can be live.
        let _ = walk_records(&self.sb, seg, buf, |rec, first_data_phys| {
            let mut d = 0u32;
            for e in &rec.entries {
                let phys0 = first_data_phys + d;
                if e.kind.has_data() {
                    d += e.n_blocks;
                }
                if e.volume != volume {
                    continue;
                }
                let newer = match since {
                    Since::Lsn(lsn) => e.kind.has_data() && e.data_lsn > lsn,
                    Since::Tag(tag) => e.tag > tag,
                };
                if !newer {
                    continue;
                }
                if e.kind == EntryKind::Trim {
                    let end = (e.lba.0 + e.n_blocks as u64).min(n_blocks);
                    if e.lba.0 < end {
                        found.push((e.lba.0, end));
                    }
                    continue;
                }
                for i in 0..e.n_blocks {
                    let lba = e.lba.0 + i as u64;
                    let live = lba < n_blocks
                        && (phys_of(vol.index.get(lba)) == Some(phys0 + i)
                            || vol.staged.writes.get(&lba).and_then(|p| phys_of(*p)) == Some(phys0 + i));
                    if live {
                        found.push((lba, lba + 1));
                    }
                }
            }
        });
        if let Some(scan) = self.scans.front_mut() {
            scan.found.extend(found);
        }
    }

    // -----------------------------------------------------------------------------------------
    // Shutdown and block status.

    fn step_shutdown(&mut self) {
        if self.shutdown.is_none() || self.finished {
            return;
        }
        let idle = self.intake.is_empty()
            && self.stall.is_none()
            && self.batches.is_empty()
            && self.open_batch.as_ref().is_none_or(|b| b.entries.is_empty())
            && self.sync_waiters.is_empty()
            && matches!(self.ckpt, CkptPhase::Idle)
            && !self.ckpt_wanted
            && self.scans.is_empty()
            && self.tokens.is_empty();
        if idle {
            let st = &self.stats;
            tracing::info!(
                batches = st.batches,
                syncs = st.syncs,
                durable_writes = st.durable_writes,
                write_back_acks = st.write_back_acks,
                checkpoints = st.checkpoints,
                write_amplification = format!("{:.2}", st.write_amplification()),
                segments_cleaned = st.segments_cleaned,
                "engine stopped cleanly"
            );
            let reply = self.shutdown.take().expect("shutdown");
            let _ = reply.send(match err_poisoned(&self.poisoned) {
                Some(e) => Err(e),
                None => Ok(()),
            });
            self.finished = true;
        } else if self.poisoned.is_some() && self.tokens.is_empty() {
            let reply = self.shutdown.take().expect("shutdown");
            let _ = reply.send(Err(err_poisoned(&self.poisoned).expect("poisoned")));
            self.finished = true;
        }
    }

    /// Answered at intake, like a read: the index holds every applied write; the unapplied ones
    /// (`pending`, `pending_unmaps`) are newer, and `pending` newer than `pending_unmaps` (an unmap
    /// clears the pending blocks it covers), the same precedence as `current_block`.
    fn block_crcs(&self, volume: VolumeId, offset: u64, len: u64) -> Result<Vec<Option<u32>>> {
        self.check_range(volume, offset, len, true)?;
        if offset % BB != 0 || len % BB != 0 {
            return Err(Error::InvalidArgument(format!(
                "block checksums need a block-aligned range, got {len} bytes at {offset}"
            )));
        }
        if len / BB > MAX_CRC_BLOCKS {
            return Err(Error::TooLarge { len, limit: MAX_CRC_BLOCKS * BB });
        }
        let vol = self.state.volumes.get(&volume).expect("checked");
        let (first, end) = (offset / BB, (offset + len) / BB);
        let mut out = vec![None; (end - first) as usize];
        vol.for_each_effective(first, end, |lba, e| out[(lba - first) as usize] = Some(crc_of(e)));
        for &(_, v, s, e) in &self.pending_unmaps {
            if v == volume {
                for lba in s.max(first)..e.min(end) {
                    out[(lba - first) as usize] = None;
                }
            }
        }
        for (&(v, lba), p) in &self.pending {
            if v == volume && (first..end).contains(&lba) {
                out[(lba - first) as usize] = p.data.as_deref().map(block_crc);
            }
        }
        Ok(out)
    }

    fn block_status(&self, volume: VolumeId, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check_range(volume, offset, len, true)?;
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
                Some(e) if e.mapped == mapped && e.offset + e.len == start => e.len += stop - start,
                _ => extents.push(Extent { offset: start, len: stop - start, mapped }),
            }
        };
        let mut cursor = first;
        let mut mapped_lbas = Vec::new();
        vol.for_each_effective(first, last, |lba, _| mapped_lbas.push(lba));
        for (key, p) in &self.pending {
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
}

/// Decodes the records of a segment image (`buf` starts at the segment header) in log order,
/// calling `f(record, data_at)`, where `data_at` is the block index of the record's first data
/// block, until `f` returns `Ok(false)` or an error. Errors say where parsing stopped.
fn for_each_record(
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
fn walk_records(sb: &Superblock, seg: u32, buf: &[u8], mut f: impl FnMut(&RecordHeader, u32)) -> Result<(), String> {
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
fn walk_data_blocks(
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn block_hash_keeps_consecutive_lbas_adjacent_with_distinct_tags() {
        let h = BlockHash::default();
        let key = |vol: u32, lba: u64| h.hash_one((VolumeId(vol), lba));
        let tag = |x: u64| x >> 57;
        let low = |x: u64| x & ((1 << 40) - 1);
        let base = 1_000_000u64;
        for i in 0..256 {
            assert_eq!(low(key(1, base + i)), low(key(1, base)) + i, "bucket bits follow the LBA");
        }
        let tags: std::collections::HashSet<u64> = (0..16).map(|i| tag(key(1, base + i))).collect();
        assert!(tags.len() >= 12, "neighbours in a probe group get mostly distinct tags: {tags:?}");
        assert_ne!(key(1, base), key(2, base), "volumes differ");
        // Any key type still hashes deterministically through the byte path.
        assert_eq!(h.hash_one("abc"), h.hash_one("abc"));
        assert_ne!(h.hash_one("abc"), h.hash_one("abd"));
    }
}
