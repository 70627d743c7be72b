//! The engine core: a single-owner state machine that turns requests into device I/O.
//!
//! Events in ([`Core::push_request`], [`Core::on_completion`]), I/O out ([`Core::take_ops`]);
//! replies go straight to each request's oneshot channel. The core never blocks and never touches
//! a file descriptor, so the same code runs on io_uring in production and on the simulated device in
//! the power-cut tests. The driver ([`crate::store`]) owns the loop.
//!
//! The core is composed of one machine per concern, each owning its state and its invariants (the
//! way TigerBeetle's replica is composed of its journal, superblock, grid and free set):
//!
//! | machine | file | owns |
//! |---|---|---|
//! | [`Intake`] | `intake.rs` | the request queue, validation, read-modify-write stalls, volume changes |
//! | [`Reads`] | `reads.rs` | reads in flight; block status, checksums and places |
//! | [`Log`] | `log.rs` | the open batch, sealed and in-flight batches, LSNs, the pending-block map |
//! | [`Durability`] | `durability.rs` | writers waiting for their batches, syncs, the durable LSN |
//! | [`Segments`] | `segments.rs` | the segment table: free, open, sealed, reuse |
//! | [`Cleaner`] | `cleaner.rs` | the victim being copied forward |
//! | [`Checkpointer`] | `checkpointer.rs` | the checkpoint phases |
//! | [`Scans`] | `scans.rs` | changed-block scans for replication resync |
//!
//! This file holds what ties them together: [`Core::run`], which steps every machine until none
//! makes progress, [`Core::on_completion`], which hands each completed I/O to the machine that
//! issued it, and [`Core::check_invariants`], which runs after every step in debug builds (every
//! test, the simulator included).
//!
//! The write path, in order (the whole life of a write, from NBD to the reply, is in
//! ARCHITECTURE.md):
//! 1. *Intake.* A write (or trim, or zeroing) is split into 4 KiB blocks; partial blocks are merged
//!    with their current content (read-modify-write; intake pauses until that read returns so that
//!    requests stay in arrival order). Blocks go into the *open batch*.
//! 2. *Seal.* When fewer than `max_inflight_batches` batches are in flight, the open batch gets the
//!    next LSN and a place at the log head, and becomes one device write: group commit.
//! 3. *Apply.* Completed batches are applied to the index strictly in LSN order (so a younger batch
//!    completing first can never be overwritten by an older one), then their writes are acknowledged.
//! 4. *Sync.* FLUSH and FUA wait for one shared fdatasync issued once every batch up to their LSN
//!    has completed, or for a batch written durably (FUA) right after a durable one (see
//!    `Core::submit_batches`).
//!
//! Invariants, each stated where its owner establishes it and checked by `check_invariants`:
//! - The index only points at blocks whose write has completed ([`Log`]).
//! - A segment is reused only when nothing live is in it, every record that superseded its blocks
//!   is durable, no read is in flight on it, and it was sealed before the last durable checkpoint
//!   (so recovery from that checkpoint never needs its old contents) ([`Segments`]).
//! - No checkpoint is taken while a batch is in flight or the cleaner holds copies not yet applied,
//!   so a checkpoint equals the state after applying every record below its `next_lsn`
//!   ([`Checkpointer`]).
//! - After a failed write or sync, every later write, trim, flush and volume change fails with
//!   [`Error::Poisoned`]: checked once, where requests are admitted ([`Intake`]), and the background
//!   machines stop.

mod checkpointer;
mod cleaner;
mod durability;
mod intake;
mod log;
mod reads;
mod request;
mod scans;
mod segments;

use std::collections::{BTreeMap, HashMap, VecDeque};

use bytes::{Bytes, BytesMut};
use tokio::sync::oneshot;

use crate::buf::AlignedBuf;
use crate::checkpoint::{CheckpointData, RunRec, SegmentRec, VolumeRec};
use crate::device::{Completion, IoKind, IoOp};
use crate::error::{Error, Result};
use crate::format::{
    block_crc, header_blocks_for, CheckpointHeader, Entry, EntryKind, MetaOp, RecordHeader, RecordKind, SegmentHeader,
    StagedOp, Superblock, ATTR_BYTES_MAX, BATCH_BLOCKS_MAX, NAME_BYTES_MAX,
};
use crate::index::{crc_of, phys_of};
use crate::predict::CommitLoop;
use crate::segment_image::{walk_data_blocks, walk_records};
use crate::state::{State, VolumeInfo, VOLUMES_MAX};
use crate::types::{BlockRun, ByteRange, Lba, Lsn, SegmentId, Tag, VolumeId, BLOCK_BYTES, BLOCK_BYTES_U64 as BB};

use checkpointer::{Checkpointer, CkptPhase};
use cleaner::{Cleaner, Gc};
use durability::{Done, Durability, Waiter};
use intake::{check_scattered, Intake, Piece, Stall, WriteOp};
use log::{BlockHash, Log};
use reads::Reads;
use scans::Scans;
use segments::Segments;

pub use log::WRITE_BACK_BLOCKS_MAX;
pub use reads::{BlockPlace, CRC_BLOCKS_MAX, PLACES_BLOCKS_MAX, SCATTERED_BLOCKS_MAX};
pub use request::{ChangedRun, Config, Driver, Extent, Reply, Request, Since, Stats, Written, IO_BYTES_MAX};
pub(crate) use segments::{SegState, SegStatus};

static ZERO_BLOCK: [u8; BLOCK_BYTES] = [0; BLOCK_BYTES];

/// Passes of every step that one [`Core::run`] makes at most. A pass that changes nothing ends the
/// run; in practice a run settles in two to four passes. The bound turns a step that claims
/// progress forever (a bug) into a logged error instead of a hung engine thread.
const STEP_PASSES_MAX: usize = 64;

/// What a device operation in flight was for; its completion goes back to the machine that
/// issued it.
enum Token {
    Batch(Lsn),
    Sync { through: Lsn },
    Read(reads::ReadPart),
    Blocks(reads::BlocksPart),
    RmwRead { lba: u64, seg: u32, crc: u32, phys: u32 },
    GcRead { seg: u32 },
    ScanRead { seg: u32 },
    CheckpointWrite,
}

/// Device operations in flight and those waiting to be handed to the driver.
#[derive(Default)]
struct Io {
    tokens: HashMap<u64, Token, BlockHash>,
    next_token: u64,
    out: Vec<IoOp>,
}

pub struct Core {
    sb: Superblock,
    cfg: Config,
    pub(crate) state: State,
    intake: Intake,
    reads: Reads,
    log: Log,
    durability: Durability,
    segments: Segments,
    gc: Cleaner,
    ckpt: Checkpointer,
    scans: Scans,
    io: Io,
    shutdown: Option<Reply<()>>,
    finished: bool,
    /// Why the engine stopped accepting changes, after a failed write or sync.
    poisoned: Option<String>,
    stats: Stats,
}

impl Core {
    /// A core over recovered state. `next_lsn - 1` is the last LSN recovered (all of it durable).
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
            intake: Intake::default(),
            reads: Reads::default(),
            log: Log::new(next_lsn),
            durability: Durability::new(Lsn(next_lsn.0 - 1)),
            segments: Segments::new(segs, next_seg_seq),
            gc: Cleaner::default(),
            ckpt: Checkpointer::new(ckpt_seq),
            scans: Scans::default(),
            io: Io::default(),
            shutdown: None,
            finished: false,
            poisoned: None,
            stats,
        }
    }

    pub fn push_request(&mut self, req: Request) {
        self.intake.queue.push_back(req);
    }

    pub fn take_ops(&mut self) -> Vec<IoOp> {
        std::mem::take(&mut self.io.out)
    }

    /// True once a shutdown request has been fully served.
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// True when nothing is in progress and everything ever written is durable: a flush now would
    /// have nothing to wait for.
    pub fn all_durable(&self) -> bool {
        self.poisoned.is_none()
            && self.intake.queue.is_empty()
            && self.intake.stall.is_none()
            && self.log.open.as_ref().is_none_or(|b| b.entries.is_empty() && b.meta.is_none())
            && self.log.batches.is_empty()
            && self.durability.durable_lsn.next() == self.log.next_lsn
            && self.shutdown.is_none()
    }

    /// Flushes answered by the driver without a trip here, because everything was durable already
    /// (see [`Core::all_durable`]): they count for the prediction in [`Core::submit_batches`].
    pub fn note_flushes(&mut self, n: u64) {
        for _ in 0..n.min(CommitLoop::streak_max()) {
            self.log.commit_loop.note_flush();
        }
    }

    /// True when I/O is in flight, so the driver should wait on the device.
    pub fn io_in_flight(&self) -> bool {
        !self.io.tokens.is_empty()
    }

    fn submit(&mut self, token: Token, kind: IoKind) {
        let id = self.io.next_token;
        self.io.next_token += 1;
        self.io.tokens.insert(id, token);
        self.io.out.push(IoOp { token: id, kind });
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

    fn poisoned_error(&self) -> Option<Error> {
        self.poisoned.as_ref().map(|cause| Error::Poisoned { cause: cause.clone() })
    }

    pub fn stats(&self) -> Stats {
        let mut s = self.stats.clone();
        s.next_lsn = self.log.next_lsn;
        s.durable_lsn = self.durability.durable_lsn;
        s.free_segments = self.free_segments() as u32;
        s.reserved_segments = self.gc_low_segments() as u32;
        s.live_blocks = self.state.live.iter().map(|l| *l as u64).sum();
        s.index_heap_bytes = self.state.volumes.values().map(|v| v.index.heap_bytes() as u64).sum();
        s
    }

    // -----------------------------------------------------------------------------------------
    // The step loop.

    /// Processes queued requests and advances every machine; call after pushing requests and after
    /// completions. Each step says whether it changed anything another step could act on; the run
    /// ends after a pass in which none did.
    pub fn run(&mut self) {
        for _ in 0..STEP_PASSES_MAX {
            let mut progress = self.step_intake();
            self.check_invariants();
            // After a failed write or sync nothing may reach the device: the background machines
            // stop, and intake refuses every change.
            if self.poisoned.is_none() {
                progress |= self.step_cleaner();
                self.check_invariants();
                progress |= self.step_log();
                self.check_invariants();
                progress |= self.step_syncs();
                self.check_invariants();
                progress |= self.step_checkpoint();
                self.check_invariants();
                progress |= self.step_free();
                self.check_invariants();
            }
            progress |= self.reply_synced();
            progress |= self.step_scans();
            progress |= self.step_shutdown();
            self.check_invariants();
            if !progress {
                if self.io.tokens.is_empty() && self.work_waiting() {
                    // Nothing in flight yet work is waiting: nothing will ever wake it. A bug.
                    tracing::error!(
                        "engine idle with pending work: intake {} stall={} batches {} waiters {} sync waiters {} checkpoint {} free={} gc_low={} reuse_below={}",
                        self.intake.queue.len(),
                        match &self.intake.stall { Some(Stall::Rmw { .. }) => "rmw", Some(Stall::Space { .. }) => "space", None => "none" },
                        self.log.batches.len(), self.durability.waiters.len(), self.durability.sync_waiters.len(),
                        self.ckpt.phase.name(), self.free_segments(), self.gc_low_segments(), self.segments.reuse_below_seq
                    );
                }
                return;
            }
        }
        tracing::error!(
            "engine steps still report progress after {STEP_PASSES_MAX} passes; continuing on the next event"
        );
    }

    /// Work that only a step or a completion can move on.
    fn work_waiting(&self) -> bool {
        !self.intake.queue.is_empty()
            || self.intake.stall.is_some()
            || !self.durability.sync_waiters.is_empty()
            || !self.durability.waiters.is_empty()
            || !matches!(self.ckpt.phase, CkptPhase::Idle)
    }

    /// Checks what each machine promises (see the module documentation). Debug builds only: it
    /// visits the segment table and every batch in flight after every step. Not after poisoning:
    /// the batches were dropped unapplied, and nothing will reach the device again.
    fn check_invariants(&self) {
        if cfg!(debug_assertions) && self.poisoned.is_none() {
            self.check_segments();
            self.check_log();
            self.check_durability();
            self.check_cleaner();
            self.check_checkpointer();
        }
    }

    // -----------------------------------------------------------------------------------------
    // Completions.

    /// Hands a completed device operation to the machine that issued it.
    pub fn on_completion(&mut self, c: Completion) {
        let Some(token) = self.io.tokens.remove(&c.token) else {
            tracing::error!("completion for unknown token {}", c.token);
            return;
        };
        match token {
            Token::Batch(lsn) => self.batch_written(lsn, c.result),
            Token::Sync { through } => self.synced(c.token, through, c.result),
            Token::Read(part) => self.read_done(part, c),
            Token::Blocks(part) => self.blocks_read_done(part, c),
            Token::RmwRead { lba, seg, crc, phys } => self.rmw_read_done(lba, seg, crc, phys, c),
            Token::GcRead { seg } => self.victim_read(seg, c),
            Token::ScanRead { seg } => self.scan_read(seg, c),
            Token::CheckpointWrite => self.checkpoint_written(c.result),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Shutdown.

    fn step_shutdown(&mut self) -> bool {
        if self.shutdown.is_none() || self.finished {
            return false;
        }
        let idle = self.intake.queue.is_empty()
            && self.intake.stall.is_none()
            && self.log.batches.is_empty()
            && self.log.open.as_ref().is_none_or(|b| b.entries.is_empty())
            && self.durability.sync_waiters.is_empty()
            && matches!(self.ckpt.phase, CkptPhase::Idle)
            && !self.ckpt.wanted
            && self.scans.queue.is_empty()
            && self.io.tokens.is_empty();
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
        } else if self.poisoned.is_none() || !self.io.tokens.is_empty() {
            return false;
        }
        let reply = self.shutdown.take().expect("shutdown");
        let _ = reply.send(match self.poisoned_error() {
            Some(e) => Err(e),
            None => Ok(()),
        });
        self.finished = true;
        true
    }
}
