//! The primary's owner: one struct, one task, one loop. It selects the next event — a client
//! operation, an engine completion, a frame from the peer, the link coming up or going down, a
//! timer, a witness answer — applies it, then checks its invariants (in debug builds, so in every
//! test and in the simulation) and publishes its status. No replication state is shared with any
//! other task: the link's reader and writer only move bytes (`link.rs`), requests to the witness
//! and the resync's scan run as futures whose results come back as events, and `syncblock status`
//! reads what the loop published without waiting for it.
//!
//! The loop is also the *sequencer*: tags are assigned, operations queued in the local engine and
//! frames queued on the link in the order the loop handles them, so the engine's order, the tag
//! order and the link order are one order (`docs/replication.md`, "Tags"). Every step that must
//! happen "at a point of that order" — a resync window's block status and reads, a checksum
//! request, a verify repair — happens inside one step of the loop, between two client operations.
//!
//! Size: the loop's state and the handler of each event, which read and write that state; the
//! background work (resync, verify: `background.rs`), timers (`timers.rs`) and tests (`tests.rs`)
//! are apart already. Splitting the handlers further would put one state machine in many rooms.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use syncblock_engine::{BlockRun, ByteRange, CommitLoop, Lba, Pending, Since, Store, Tag, VolumeId, BLOCK_BYTES_U64};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::compare::windows;
use super::lag::Lag;
use super::link::{AbortOnDrop, Out};
use super::report::{PeerView, Progress, VerifyReport};
use crate::state::{FloorRecord, ReplState, FLOOR_PERIOD};
use crate::wire::{EpochStart, Frame, Refusal};
use crate::witness::Grant;
use crate::{Policy, ReplConfig, ReplError, Result};

mod background;
mod handover;
mod timers;

/// Frames queued on the link's writer. Each holds at most one client write (≤ 32 MiB, bounded
/// further by the NBD layer's in-flight limits) or one resync piece (≤ 1 MiB). When it is full,
/// the loop keeps what it could not queue and takes no new client operation until the writer has
/// caught up: that is the backpressure from a slow peer. The loop itself never waits for the
/// link, so it always hears the peer's acknowledgements.
const LINK_QUEUE: usize = 256;
/// Events from the link's reader and the loop's helper futures waiting to be handled. The loop
/// waits on nothing that depends on them, so a full queue only pauses the reader (TCP then pushes
/// back on the peer).
pub(super) const EVENTS_MAX: usize = 1024;
/// Resync reads are issued in pieces of at most this much: one engine batch.
const RESYNC_READ_BYTES: u64 = 1 << 20;
/// Items the link may hold before a verify pass takes its next step: 8, at most about 8 MiB of
/// repairs, so the volume's own writes, queued behind them in the engine and on the link, wait
/// ~20 ms at disk speed instead of the whole queue's 256 MiB. The link still always has work.
const VERIFY_AHEAD_MAX: usize = 8;
/// Resync data shipped and not yet confirmed applied by the peer (each step ends with a ping; its
/// pong confirms the step), while the volume's clients are quiet: enough to keep a disk that
/// writes ~500 MiB/s busy across a round trip of ~20 ms through the primary's read, the link and
/// the peer's write. Everything in flight is ahead of a client write that arrives now, in the
/// engine, on the link, in the socket buffers and in the peer's apply queue.
const RESYNC_UNCONFIRMED_MAX: u64 = 16 << 20;
/// One resync step ships at most this much, and ends with a ping whose pong confirms it: with
/// `RESYNC_UNCONFIRMED_MAX` in steps of this size, the window refills a step at a time as the peer
/// applies them, instead of all at once after the last (stop and wait).
const RESYNC_STEP_BYTES_MAX: u64 = 4 << 20;
/// The same while clients are active (an operation in flight, or one within `CLIENT_QUIET`): a
/// client write then waits behind at most this much resync data, a few milliseconds, and the
/// resync still moves by this much per round trip. At re-protection under 4 KiB QD32 random
/// writes, 512 KiB kept 0.60-0.62 of the volume's in-sync rate and copied at 93-101 MiB/s; 1 MiB
/// kept 0.48-0.50 and copied at 103-115 MiB/s.
const RESYNC_UNCONFIRMED_BUSY_MAX: u64 = 512 << 10;
/// A step while clients are active: a quarter of that window, so that four steps are in flight and
/// the window refills as each is confirmed. In one step of 512 KiB the copy stopped and waited
/// for each pong: at re-protection under 4 KiB QD32 random writes it ran at 109-127 MiB/s with
/// the volume keeping 0.73-0.78 of its in-sync rate; in steps of 128 KiB, 162-168 MiB/s and 0.83
/// (256 KiB: 157 MiB/s, 0.79-0.87). A client write still waits behind at most the window.
const RESYNC_STEP_BUSY_BYTES_MAX: u64 = RESYNC_UNCONFIRMED_BUSY_MAX / 4;
/// Clients count as active this long after their last operation: longer than the gap between
/// the operations of a client that writes and flushes one at a time.
const CLIENT_QUIET: Duration = Duration::from_millis(50);
/// A resync ships at most this many blocks of its ranges per pass in log order (see
/// `Owner::plan_order`): 2 GiB of data, a plan of 4 MiB (8 MiB while it is sorted). Within a pass
/// the blocks are read in the order they lie on the device, so a volume scattered by random writes
/// is read mostly sequentially; a volume larger than this, scattered over its whole log, is read
/// in passes each touching a part of the log's blocks. (256 under unit tests, so that their 4 MiB
/// volumes take several passes.)
#[cfg(not(test))]
const ORDER_BLOCKS_MAX: u64 = 1 << 19;
#[cfg(test)]
const ORDER_BLOCKS_MAX: u64 = 1 << 8;
const _: () = assert!(ORDER_BLOCKS_MAX <= syncblock_engine::PLACES_BLOCKS_MAX, "a pass is one place request");
/// Places sorted off the loop (on a blocking thread) past this many: a sort of 4096 takes about
/// 0.1 ms; one of 512 Ki, tens of milliseconds. (64 under unit tests, so that they sort off the
/// loop too.)
#[cfg(not(test))]
const SORT_INLINE_MAX: usize = 1 << 12;
#[cfg(test)]
const SORT_INLINE_MAX: usize = 1 << 6;
/// Full sync and verify compare checksums in windows of this size: 2048 blocks, an 8 KiB answer
/// at most. Small enough that one step of the loop is short (one index walk, a few reads queued),
/// large enough that the per-window round trip is negligible.
const CRC_WINDOW_BYTES: u64 = 8 << 20;
/// Checksum requests in flight ahead of the window being compared, so the link keeps shipping
/// while an answer travels back.
const CRC_LOOKAHEAD: usize = 4;
/// Differing ranges a verify report lists; beyond that it only counts blocks.
const VERIFY_RANGES_MAX: usize = 4096;
/// Log a warning while client operations have waited this long for the peer, and again every
/// `WAIT_WARN_EVERY` while they still wait: under the strict policy (or without the witness's
/// consent to go on alone) a write waits for the peer for as long as it is away.
const WAIT_WARN_AFTER: Duration = Duration::from_secs(2);
const WAIT_WARN_EVERY: Duration = Duration::from_secs(10);
/// The status a client reads (`syncblock status`) is at most this old: publishing it takes a walk
/// over the operations in flight and the lag samples, too much to do after every event at tens of
/// thousands of operations a second.
const PUBLISH_EVERY: Duration = Duration::from_millis(2);
/// Ready events, completions and client operations one turn of the loop handles at most, each:
/// enough to batch a full queue depth, few enough that a turn stays short.
const DRAIN_MAX: usize = 64;

/// A client operation, from a [`super::Primary`] handle. Each is answered on its `reply` once it
/// is in the local log and confirmed by the peer (or acknowledged alone, with the witness's
/// consent), with its tag.
pub(super) enum Command {
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
        reply: oneshot::Sender<Result<u64>>,
    },
    Trim {
        offset: u64,
        len: u64,
        reply: oneshot::Sender<Result<u64>>,
    },
    Zeroes {
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
        reply: oneshot::Sender<Result<u64>>,
    },
    Flush {
        reply: oneshot::Sender<Result<u64>>,
    },
    Verify {
        repair: bool,
        reply: oneshot::Sender<Result<VerifyReport>>,
    },
    /// A newer primary reached this node's replication port (see `node::listen_for_successor`).
    Depose(String),
    /// The peer is now at this address (cluster mode moved the volume's other replica, or its node
    /// came back on another address): drop the link and connect there.
    Repeer(SocketAddr),
    /// Hand the primary role to the peer node `to` (see `handover.rs`).
    HandOver {
        to: String,
        reply: oneshot::Sender<Result<Grant>>,
    },
}

/// What the link's tasks and the loop's helper futures report. Link events carry the link's
/// generation: a late report of a link already replaced is ignored.
pub(super) enum Event {
    /// A frame from the peer.
    Frame(u64, Frame),
    /// The link ended, or could not be set up.
    LinkDown(u64, ReplError),
    /// Connected, and the peer accepted the hello.
    LinkUp(u64, Box<Handshake>),
    /// The resync's plan: the runs of blocks to ship, and whether it is a full sync.
    ResyncPlan(u64, Result<(Vec<BlockRun>, bool)>),
    /// The witness answered.
    Witness(Ask, Result<Grant>),
    /// The trim floor was recorded (or not).
    FloorWritten(u64, Result<()>),
}

/// What a request to the witness asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ask {
    Report,
    Handover,
    Solo,
}

/// A connection whose hello the peer accepted.
pub(super) struct Handshake {
    rd: crate::net::ReadPart,
    wr: crate::net::WritePart,
    peer_last: u64,
    common: u64,
    runs: Vec<BlockRun>,
}

/// What the loop publishes besides the peer's view.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Published {
    pub last_tag: u64,
    pub lag_bytes: u64,
    /// When the oldest write the peer lacks was made.
    pub lag_since: Option<Instant>,
    /// The witness answered the last request this primary sent it (None without a witness), and
    /// why not.
    pub witness: Option<Result<(), String>>,
    pub waiting: usize,
    pub waiting_since: Option<Instant>,
    pub stages: Stages,
}

/// Where answered client operations spent their time, summed since the primary started, in
/// microseconds: the latency breakdown of `docs/benchmarks-replication.md`. Each sum runs from
/// the moment the loop took the operation, except `handoff_us`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stages {
    /// Operations answered.
    pub ops: u64,
    /// From the client's call to the loop taking the operation (a task hand-off, and waiting
    /// behind other events).
    pub handoff_us: u64,
    /// To the local engine's completion (its log write, or its flush).
    pub local_us: u64,
    /// To the peer's confirmation (its log, or its durability): the round trip to the peer.
    pub peer_us: u64,
    /// To the answer: the later of the two.
    pub answer_us: u64,
}

/// What a client operation was, for its completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Write,
    Flush,
}

/// A client operation in flight: queued in the engine and (if there is a link) on the link.
struct Op {
    tag: u64,
    /// Needs the peer's `durable` (FUA, flush) rather than `applied`.
    durable: bool,
    kind: Kind,
    /// When the client called, and when the loop took the operation.
    sent: Instant,
    taken: Instant,
    /// When the local engine completed it (it then waits for the peer only), and when the peer
    /// confirmed it.
    local_at: Option<Instant>,
    peer_at: Option<Instant>,
    reply: oneshot::Sender<Result<u64>>,
}

type EngineDone = Pin<Box<dyn std::future::Future<Output = (u64, syncblock_engine::Result<()>)> + Send>>;

enum LinkState {
    /// No link; the next attempt at `retry_at`.
    Down {
        retry_at: Instant,
    },
    /// Dialing and saying hello, as link `generation`.
    Connecting {
        generation: u64,
    },
    Up(Link),
}

struct Link {
    generation: u64,
    tx: mpsc::Sender<Out>,
    /// What did not fit in `tx`, in order; sent before anything else.
    backlog: VecDeque<Out>,
    _writer: AbortOnDrop<()>,
    _reader: AbortOnDrop<()>,
}

/// The resync of the current link.
enum Resync {
    /// The local flush and the scan for what changed run off the loop.
    Planning,
    /// Shipping the current contents of the changed ranges (`todo`: what is left of them), a pass
    /// of at most `ORDER_BLOCKS_MAX` blocks at a time in log order (`order`), up to a step's budget
    /// at a time.
    Ship { todo: VecDeque<ByteRange>, order: LogOrder },
    /// A full sync: checksum windows, asked `CRC_LOOKAHEAD` ahead and compared in order; the
    /// ranges found different (`todo`) are shipped as in `Ship` once every window is compared or
    /// they make up a pass.
    Compare {
        windows: Vec<ByteRange>,
        next_ask: usize,
        asked: VecDeque<(u64, usize)>,
        todo: VecDeque<ByteRange>,
        order: LogOrder,
    },
    /// The commit and the ping that proves it applied are queued.
    Committing { tag: u64, nonce: u64 },
}

/// A pass of a resync: blocks to ship, in the order they lie in this node's log when the pass
/// was planned, and how many are shipped.
#[derive(Default)]
pub(super) struct LogOrder {
    lbas: Vec<u64>,
    next: usize,
}

impl LogOrder {
    fn is_done(&self) -> bool {
        self.next >= self.lbas.len()
    }
}

/// Block checksums of a window, `None` for an unmapped block.
type Crcs = Vec<Option<u32>>;

/// A verify pass on link `generation`.
struct Verify {
    generation: u64,
    repair: bool,
    windows: Vec<ByteRange>,
    next_ask: usize,
    /// (checksum request id, window, this node's answer at the same point of the order).
    asked: VecDeque<(u64, usize, Pending<Crcs>)>,
    report: VerifyReport,
    started: Instant,
    reply: oneshot::Sender<Result<VerifyReport>>,
}

/// Timers, each the next instant it is due.
struct Timers {
    ping: Instant,
    report: Instant,
    /// The earliest next request to continue alone (`Owner::ask_solo_if_due`).
    solo: Instant,
    floor: Instant,
    warn: Instant,
}

pub(super) struct Owner {
    store: Store,
    volume: VolumeId,
    name: String,
    size_bytes: u64,
    peer_addr: SocketAddr,
    cfg: ReplConfig,
    state: ReplState,
    next_tag: u64,
    /// Client writes against flushes: while a client commits write by write, each write is
    /// shipped as FUA, so the peer makes it durable as it lands and its ack already covers the
    /// flush that follows, which then needs no frame and no round trip.
    commit_loop: CommitLoop,
    peer: Arc<watch::Sender<PeerView>>,
    /// Why this primary was deposed, once it is: apart from `peer`, so that what waits for a
    /// deposition is not woken by every acknowledgement.
    deposed: Arc<watch::Sender<Option<String>>>,
    /// The epoch a switchover granted, once it has (0: none): see [`super::Primary::handed_over`].
    handed_over: Arc<AtomicU64>,
    published: watch::Sender<Published>,
    /// When the status was last published, and whether it is due again (see `PUBLISH_EVERY`).
    published_at: Instant,
    publish_due: bool,
    lag: Lag,
    /// Highest tag made durable locally by a completed flush.
    local_durable: u64,
    /// The trim floor's record.
    floor: FloorRecord,
    /// Until when solo operation is valid: one lease after the last request the witness answered
    /// (counted from when it was sent). Past it, solo ends and writes wait again.
    solo_until: Option<Instant>,
    ops: BTreeMap<u64, Op>,
    next_op: u64,
    /// An acknowledgement, a local completion or a change of the peer's state may let ops finish.
    ops_dirty: bool,
    engine: FuturesUnordered<EngineDone>,
    link: LinkState,
    generation: u64,
    last_link_error: String,
    resync: Option<Resync>,
    verify: Option<Verify>,
    /// `CrcRequest`s on the current link: id → (offset, blocks), and the answers not yet used.
    crc_asked: BTreeMap<u64, ByteRange>,
    crc_answers: BTreeMap<u64, Vec<Option<u32>>>,
    next_crc_id: u64,
    next_nonce: u64,
    /// Whether anything but a ping went on the link since the last heartbeat ping, and the floor
    /// that ping carried: a volume with neither to tell pings only every `QUIET_EVERY` on a beating
    /// node link (see `Owner::on_timers`).
    shipped: bool,
    pinged_floor: u64,
    /// The next heartbeat ping is a quiet one: the first frame shipped brings it forward.
    quiet_ping: bool,
    /// Resync steps not yet confirmed by the peer, oldest first: the step's ping nonce, and the
    /// node-wide permits its data bytes hold, one per byte (see `RESYNC_UNCONFIRMED_MAX`).
    resync_marks: VecDeque<(u64, tokio::sync::OwnedSemaphorePermit)>,
    /// The node-wide resync bytes taken for the step being made (`ReplConfig::resync_bytes`).
    step_permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// When the last client operation arrived (see `CLIENT_QUIET`).
    last_client: Option<Instant>,
    witness_asking: bool,
    /// A switchover under way: no client operation is taken meanwhile.
    handover: Option<handover::Handover>,
    /// The epoch a switchover was asked in when the authority's answer never came: granted, the
    /// record moved to the next epoch (see `Owner::on_handover_answer`).
    handover_unanswered: Option<syncblock_engine::Epoch>,
    witness_period: Duration,
    /// Since when the peer has not been connected (`None` while it is): the link timeout after it,
    /// a degrade primary asks to go on alone (`Owner::ask_solo_if_due`).
    away_since: Option<Instant>,
    last_witness_error: String,
    /// The request `last_witness_error` answered.
    witness_error_from: Ask,
    timers: Timers,
    warned: Option<Instant>,
    events_tx: mpsc::Sender<Event>,
    events: mpsc::Receiver<Event>,
    commands: mpsc::Receiver<(Instant, Command)>,
    /// When the command being handled was sent.
    sent: Instant,
    /// The loop's one timer, due at `next_deadline`.
    sleep: Pin<Box<tokio::time::Sleep>>,
    stages: Stages,
    stop: watch::Receiver<bool>,
    /// Turns of the loop so far, for the tests.
    #[cfg(test)]
    turns: Arc<std::sync::atomic::AtomicU64>,
}

/// Why the loop ended.
enum End {
    Stopped,
    Deposed(String),
}

/// What one turn of the loop selected.
enum Next {
    Stop,
    Event(Event),
    Local(u64, syncblock_engine::Result<()>),
    LinkRoom(std::result::Result<mpsc::OwnedPermit<Out>, mpsc::error::SendError<()>>),
    Command(Option<(Instant, Command)>),
    Timer,
}

/// The parts of an owner that its handle shares.
pub(super) struct Parts {
    pub peer: Arc<watch::Sender<PeerView>>,
    pub deposed: Arc<watch::Sender<Option<String>>>,
    pub handed_over: Arc<AtomicU64>,
    pub published: watch::Receiver<Published>,
    pub commands: mpsc::Sender<(Instant, Command)>,
    pub stop: watch::Sender<bool>,
}

impl Owner {
    /// An owner for a primary of `state.epoch` whose log holds tags up to `last_tag`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        store: Store,
        volume: VolumeId,
        name: String,
        size_bytes: u64,
        peer_addr: SocketAddr,
        cfg: ReplConfig,
        state: ReplState,
        last_tag: u64,
        floor: u64,
        solo_until: Option<Instant>,
    ) -> (Owner, Parts) {
        // What the peer holds is unknown until it connects; counting what this node held at the
        // start as applied keeps `lag_tags` meaningful (acknowledgements only concern newer tags).
        let solo = solo_until.is_some_and(|t| Instant::now() < t);
        let peer = Arc::new(watch::channel(PeerView { applied: last_tag, solo, ..PeerView::default() }).0);
        let (published_tx, published) = watch::channel(Published { last_tag, ..Published::default() });
        let deposed = Arc::new(watch::channel(None).0);
        let handed_over = Arc::new(AtomicU64::new(0));
        let (commands_tx, commands) = mpsc::channel(LINK_QUEUE);
        let (stop_tx, stop) = watch::channel(false);
        let (events_tx, events) = mpsc::channel(EVENTS_MAX);
        let now = Instant::now();
        let heartbeat = cfg.heartbeat;
        let owner = Owner {
            store,
            volume,
            name,
            size_bytes,
            peer_addr,
            cfg,
            state,
            next_tag: last_tag + 1,
            commit_loop: CommitLoop::default(),
            peer: peer.clone(),
            deposed: deposed.clone(),
            handed_over: handed_over.clone(),
            published: published_tx,
            published_at: now,
            publish_due: false,
            lag: Lag::default(),
            local_durable: 0,
            floor: FloorRecord::new(floor, now),
            solo_until,
            ops: BTreeMap::new(),
            next_op: 0,
            ops_dirty: false,
            engine: FuturesUnordered::new(),
            link: LinkState::Down { retry_at: now },
            generation: 0,
            last_link_error: String::new(),
            resync: None,
            verify: None,
            crc_asked: BTreeMap::new(),
            crc_answers: BTreeMap::new(),
            next_crc_id: 1,
            next_nonce: 0,
            shipped: false,
            pinged_floor: 0,
            quiet_ping: false,
            resync_marks: VecDeque::new(),
            step_permit: None,
            last_client: None,
            witness_asking: false,
            handover: None,
            handover_unanswered: None,
            witness_period: heartbeat,
            // The peer is not connected yet: away since this primary started.
            away_since: Some(now),
            last_witness_error: String::new(),
            witness_error_from: Ask::Report,
            timers: Timers {
                ping: now + heartbeat,
                report: now,
                solo: now,
                floor: now + FLOOR_PERIOD,
                warn: now + WAIT_WARN_AFTER,
            },
            warned: None,
            events_tx,
            events,
            commands,
            sent: now,
            sleep: Box::pin(tokio::time::sleep_until(now)),
            stages: Stages::default(),
            stop,
            #[cfg(test)]
            turns: Default::default(),
        };
        (owner, Parts { peer, deposed, handed_over, published, commands: commands_tx, stop: stop_tx })
    }

    /// Runs until stopped or deposed; then fails every operation still waiting.
    pub(super) async fn run(mut self) {
        let end = loop {
            if let Err(e) = self.step_background().await {
                let generation = self.generation;
                self.link_failed(generation, e);
            }
            if let Some(why) = self.deposed.borrow().clone() {
                break End::Deposed(why);
            }
            let next = self.select().await;
            #[cfg(test)]
            self.turns.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // Timers change nothing the status shows (what they start answers later, as events).
            let mut changed = !matches!(next, Next::Timer);
            match next {
                Next::Stop | Next::Command(None) => break End::Stopped,
                Next::Event(e) => self.on_event(e).await,
                Next::Local(op, r) => self.on_local(op, r),
                Next::LinkRoom(Ok(permit)) => self.on_link_room(permit),
                Next::LinkRoom(Err(_)) => {} // the writer ended: its LinkDown follows
                Next::Command(Some((sent, c))) => {
                    self.sent = sent;
                    self.on_command(c).await
                }
                Next::Timer => self.on_timers(),
            }
            changed |= self.drain_ready().await;
            self.complete_ops();
            self.step_handover();
            self.check_invariants();
            // Not after a quiet timer turn: the timer that published a deferred status would
            // otherwise defer the next one, and an idle volume woke every `PUBLISH_EVERY` (2 ms)
            // for ever: 9 % of a core for 100 idle volumes.
            if changed {
                self.publish();
            }
        };
        let why = match end {
            End::Stopped => "replication stopped before the peer confirmed".to_string(),
            End::Deposed(why) => format!("deposed: {why}"),
        };
        for (_, op) in std::mem::take(&mut self.ops) {
            let _ = op.reply.send(Err(ReplError::Stopped(why.clone())));
        }
        if let Some(v) = self.verify.take() {
            let _ = v.reply.send(Err(ReplError::Stopped(why.clone())));
        }
        self.link = LinkState::Down { retry_at: Instant::now() };
        self.publish_now();
    }

    /// Handles what is already waiting — peer frames, engine completions, client operations — up
    /// to `DRAIN_MAX` of each, before the turn's bookkeeping: under load one turn then answers many
    /// operations, instead of one turn (and one walk over the operations) each.
    /// Handles what is ready without waiting; whether it handled anything.
    async fn drain_ready(&mut self) -> bool {
        use futures_util::FutureExt;
        let mut handled = false;
        for _ in 0..DRAIN_MAX {
            match self.events.try_recv() {
                Ok(e) => self.on_event(e).await,
                Err(_) => break,
            }
            handled = true;
        }
        for _ in 0..DRAIN_MAX {
            if self.engine.is_empty() {
                break;
            }
            match self.engine.next().now_or_never() {
                Some(Some((op, r))) => self.on_local(op, r),
                _ => break,
            }
            handled = true;
        }
        for _ in 0..DRAIN_MAX {
            let accepting = match &self.link {
                LinkState::Up(l) => l.backlog.is_empty(),
                _ => true,
            } && self.handover.is_none();
            if !accepting || self.deposed.borrow().is_some() || *self.stop.borrow() {
                break;
            }
            match self.commands.try_recv() {
                Ok((sent, c)) => {
                    self.sent = sent;
                    self.on_command(c).await;
                }
                Err(_) => break,
            }
            handled = true;
        }
        handled
    }

    async fn select(&mut self) -> Next {
        // No client operation is taken while the link's writer is behind, or while a switchover
        // waits for those in flight.
        let accepting = match &self.link {
            LinkState::Up(l) => l.backlog.is_empty(),
            _ => true,
        } && self.handover.is_none();
        let room = match &self.link {
            LinkState::Up(l) if !l.backlog.is_empty() => Some(l.tx.clone()),
            _ => None,
        };
        let deadline = self.next_deadline();
        // One timer, moved only when the deadline moves: a new one per turn was a timer-wheel
        // insertion and removal per event.
        if self.sleep.deadline() != deadline {
            self.sleep.as_mut().reset(deadline);
        }
        // Biased, so that a seed of the simulation replays the same schedule: stopping first,
        // then what the peer and the helpers said (acknowledgements let operations finish), engine
        // completions, room on the link, new client operations, and timers last.
        tokio::select! {
            biased;
            _ = self.stop.wait_for(|s| *s) => Next::Stop,
            Some(e) = self.events.recv() => Next::Event(e),
            Some((op, r)) = self.engine.next(), if !self.engine.is_empty() => Next::Local(op, r),
            permit = async { room.expect("checked").reserve_owned().await }, if room.is_some() => {
                Next::LinkRoom(permit.map_err(|_| mpsc::error::SendError(())))
            }
            c = self.commands.recv(), if accepting => Next::Command(c),
            _ = &mut self.sleep => Next::Timer,
        }
    }

    fn next_deadline(&self) -> Instant {
        let t = &self.timers;
        let mut next = t.floor;
        // Operations can only be waiting for the peer while there are some: an idle volume does
        // not wake every second to find none.
        if !self.ops.is_empty() {
            next = next.min(t.warn);
        }
        if matches!(self.link, LinkState::Up(_)) {
            next = next.min(t.ping);
        }
        if let LinkState::Down { retry_at } = self.link {
            next = next.min(retry_at);
        }
        if self.cfg.authority.is_some() && !self.witness_asking {
            next = next.min(t.report);
            if let Some(solo) = self.solo_due() {
                next = next.min(solo);
            }
        }
        if let Some(until) = self.solo_until.filter(|_| self.peer.borrow().solo) {
            next = next.min(until);
        }
        if self.publish_due {
            next = next.min(self.published_at + PUBLISH_EVERY);
        }
        if let Some(h) = &self.handover {
            next = next.min(h.until());
        }
        next
    }

    // ---- client operations -------------------------------------------------------------------

    async fn on_command(&mut self, c: Command) {
        if matches!(c, Command::Write { .. } | Command::Trim { .. } | Command::Zeroes { .. } | Command::Flush { .. }) {
            self.last_client = Some(Instant::now());
        }
        match c {
            Command::Write { offset, data, fua, reply } => {
                let tag = self.next_tag;
                let n = data.len() as u64;
                let r = self.store.enqueue_write(self.volume, offset, data.clone(), fua, Tag::seq(tag)).await;
                let Some((pending, reply)) = queued(r, reply) else { return };
                self.next_tag += 1;
                self.lag.wrote(tag, n, Instant::now());
                self.commit_loop.note_write();
                let peer_fua = fua || self.commit_loop.flush_expected();
                self.ship(Out::Frame(Frame::Write { tag, offset, fua: peer_fua, data }));
                self.add_op(tag, fua, Kind::Write, reply, async move { pending.await.map(drop) });
            }
            Command::Trim { offset, len, reply } => {
                let tag = self.next_tag;
                let r = self.store.enqueue_trim(self.volume, offset, len, Tag::seq(tag)).await;
                let Some((pending, reply)) = queued(r, reply) else { return };
                self.next_tag += 1;
                self.ship(Out::Frame(Frame::Trim { tag, offset, len }));
                self.add_op(tag, false, Kind::Write, reply, async move { pending.await.map(drop) });
            }
            Command::Zeroes { offset, len, may_trim, fua, reply } => {
                let tag = self.next_tag;
                let r = self.store.enqueue_write_zeroes(self.volume, offset, len, may_trim, fua, Tag::seq(tag)).await;
                let Some((pending, reply)) = queued(r, reply) else { return };
                self.next_tag += 1;
                self.ship(Out::Frame(Frame::Zeroes { tag, offset, len, may_trim, fua }));
                self.add_op(tag, fua, Kind::Write, reply, async move { pending.await.map(drop) });
            }
            Command::Flush { reply } => {
                let upto = self.next_tag - 1;
                let Some((pending, reply)) = queued(self.store.enqueue_flush().await, reply) else { return };
                self.commit_loop.note_flush();
                // A peer that already has everything durably (see `commit_loop`) needs no frame.
                if !self.peer.borrow().confirms(upto, true) {
                    self.ship(Out::Frame(Frame::Flush { upto }));
                }
                self.add_op(upto, true, Kind::Flush, reply, pending);
            }
            Command::Verify { repair, reply } => self.start_verify(repair, reply).await,
            Command::Depose(why) => self.depose(why),
            Command::HandOver { to, reply } => self.start_handover(to, reply),
            Command::Repeer(addr) => {
                if addr == self.peer_addr {
                    return;
                }
                tracing::info!(volume = %self.name, old = %self.peer_addr, new = %addr, "the peer moved: replicating to its new address");
                self.peer_addr = addr;
                let generation = match &self.link {
                    LinkState::Up(l) => Some(l.generation),
                    LinkState::Connecting { generation } => Some(*generation),
                    LinkState::Down { .. } => None,
                };
                if let Some(g) = generation {
                    self.link_failed(g, ReplError::Stopped(format!("the peer moved to {addr}")));
                }
                self.link = LinkState::Down { retry_at: Instant::now() };
            }
        }
    }

    fn add_op(
        &mut self,
        tag: u64,
        durable: bool,
        kind: Kind,
        reply: oneshot::Sender<Result<u64>>,
        local: impl std::future::Future<Output = syncblock_engine::Result<()>> + Send + 'static,
    ) {
        let id = self.next_op;
        self.next_op += 1;
        let op =
            Op { tag, durable, kind, sent: self.sent, taken: Instant::now(), local_at: None, peer_at: None, reply };
        self.ops.insert(id, op);
        self.engine.push(Box::pin(async move { (id, local.await) }));
    }

    fn on_local(&mut self, id: u64, r: syncblock_engine::Result<()>) {
        let Some(op) = self.ops.get_mut(&id) else { return };
        match r {
            Ok(()) => {
                op.local_at = Some(Instant::now());
                if op.kind == Kind::Flush {
                    self.local_durable = self.local_durable.max(op.tag);
                }
                self.ops_dirty = true;
            }
            Err(e) => {
                let op = self.ops.remove(&id).expect("present");
                let _ = op.reply.send(Err(e.into()));
            }
        }
    }

    /// Answers every operation that is in the local log and confirmed by the peer.
    fn complete_ops(&mut self) {
        if !self.ops_dirty {
            return;
        }
        self.ops_dirty = false;
        let now = Instant::now();
        let mut done = Vec::new();
        {
            let peer = self.peer.borrow();
            for (id, op) in self.ops.iter_mut() {
                if op.peer_at.is_none() && peer.confirms(op.tag, op.durable) {
                    op.peer_at = Some(now);
                }
                if op.local_at.is_some() && op.peer_at.is_some() {
                    done.push(*id);
                }
            }
        }
        let mut answered = Vec::with_capacity(done.len());
        for id in done {
            let op = self.ops.remove(&id).expect("present");
            let us = |t: Option<Instant>| t.map_or(0, |t| t.saturating_duration_since(op.taken).as_micros() as u64);
            let st = &mut self.stages;
            st.ops += 1;
            st.handoff_us += op.taken.saturating_duration_since(op.sent).as_micros() as u64;
            st.local_us += us(op.local_at);
            st.peer_us += us(op.peer_at);
            st.answer_us += us(Some(now));
            answered.push(op);
        }
        // With nothing left in flight, the status is published before the answers go out: a
        // client that reads it after its last operation sees that operation (under load it may
        // be up to `PUBLISH_EVERY` old).
        if !answered.is_empty() && self.ops.is_empty() {
            self.publish_now();
        }
        for op in answered {
            let _ = op.reply.send(Ok(op.tag));
        }
    }

    // ---- the link ----------------------------------------------------------------------------

    /// Queues on the link if there is one (nothing is queued without: the next resync ships it).
    fn ship(&mut self, out: Out) {
        if !self.link_up() {
            return;
        }
        self.shipped = true;
        if self.quiet_ping {
            // Something to tell again: heartbeats at their own pace until the volume is quiet.
            self.quiet_ping = false;
            self.timers.ping = self.timers.ping.min(Instant::now() + self.cfg.heartbeat);
        }
        let LinkState::Up(link) = &mut self.link else { return };
        if !link.backlog.is_empty() {
            link.backlog.push_back(out);
            return;
        }
        match link.tx.try_send(out) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(out)) => link.backlog.push_back(out),
            // The writer ended; its LinkDown is on its way.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    fn on_link_room(&mut self, permit: mpsc::OwnedPermit<Out>) {
        let LinkState::Up(link) = &mut self.link else { return };
        let Some(out) = link.backlog.pop_front() else { return };
        permit.send(out);
        while let Some(out) = link.backlog.pop_front() {
            if let Err(e) = link.tx.try_send(out) {
                match e {
                    mpsc::error::TrySendError::Full(out) => link.backlog.push_front(out),
                    mpsc::error::TrySendError::Closed(_) => link.backlog.clear(),
                }
                break;
            }
        }
    }

    fn link_up(&self) -> bool {
        matches!(self.link, LinkState::Up(_))
    }

    fn connect(&mut self) {
        self.generation += 1;
        let generation = self.generation;
        self.link = LinkState::Connecting { generation };
        let hello = Frame::Hello {
            pair: self.state.pair,
            epoch: self.state.epoch,
            last_tag: self.next_tag - 1,
            size_bytes: self.size_bytes,
            volume: self.name.clone(),
            node: self.cfg.node.clone(),
            history: self.state.history.clone(),
        };
        let (net, peer, timeout, events) =
            (self.cfg.net.clone(), self.peer_addr, self.cfg.timeout, self.events_tx.clone());
        tokio::spawn(async move {
            let event = match handshake(net.as_ref(), peer, timeout, &hello).await {
                Ok(h) => Event::LinkUp(generation, Box::new(h)),
                Err(e) => Event::LinkDown(generation, e),
            };
            let _ = events.send(event).await;
        });
    }

    /// The peer accepted the hello: from here on every client operation is streamed, and what
    /// the peer lacks is resynced.
    fn install(&mut self, generation: u64, h: Handshake) {
        let Handshake { rd, wr, peer_last, common, runs } = h;
        tracing::info!(volume = %self.name, peer = %self.peer_addr, peer_last, common, "peer connected; resyncing");
        self.last_link_error.clear();
        let (tx, rx) = mpsc::channel(LINK_QUEUE);
        let keepalive = super::link::keepalive(self.state.epoch);
        let writer = tokio::spawn(super::link::writer(
            generation,
            wr,
            rx,
            self.events_tx.clone(),
            keepalive,
            self.cfg.heartbeat,
        ));
        let reader =
            tokio::spawn(super::link::reader(generation, rd, self.cfg.silence_limit(), self.events_tx.clone()));
        self.link = LinkState::Up(Link {
            generation,
            tx,
            backlog: VecDeque::new(),
            _writer: AbortOnDrop(writer),
            _reader: AbortOnDrop(reader),
        });
        let from = self.next_tag;
        self.away_since = None;
        if self.witness_error_from == Ask::Solo {
            // The peer is back: a refusal to go on alone no longer matters.
            self.last_witness_error.clear();
        }
        self.peer.send_modify(|v| {
            v.connected = true;
            v.in_sync = false;
            v.applied = peer_last.min(common);
            v.durable = v.durable.min(v.applied);
            v.last_error = None;
            v.resyncs += 1;
            v.resync = Progress::begin(0);
            v.resync_full = common == 0;
            v.resync_bytes_shipped = 0;
            v.resync_bytes_skipped = 0;
            v.streamed_from = from;
        });
        self.resync_marks.clear();
        self.ship(Out::Frame(Frame::ResyncBegin { common_tag: common }));
        self.resync = Some(Resync::Planning);
        let (store, volume, size_bytes, events) =
            (self.store.clone(), self.volume, self.size_bytes, self.events_tx.clone());
        tokio::spawn(async move {
            let plan = plan_resync(&store, volume, size_bytes, common, runs).await;
            let _ = events.send(Event::ResyncPlan(generation, plan)).await;
        });
        self.ops_dirty = true;
    }

    /// The link (or the attempt to set one up) of `generation` failed.
    fn link_failed(&mut self, generation: u64, e: ReplError) {
        let current = match &self.link {
            LinkState::Up(l) => l.generation == generation,
            LinkState::Connecting { generation: g } => *g == generation,
            LinkState::Down { .. } => false,
        };
        if !current {
            return;
        }
        let msg = e.to_string();
        if self.deposed_by(&e) {
            tracing::error!(volume = %self.name, "deposed: the peer has seen a newer epoch than this node's {}: {msg}", self.state.epoch);
            self.depose(msg.clone());
        }
        if msg != self.last_link_error {
            tracing::warn!(volume = %self.name, peer = %self.peer_addr, "replication link: {msg}");
            self.last_link_error = msg.clone();
        }
        self.link = LinkState::Down { retry_at: Instant::now() + self.cfg.reconnect };
        // The peer is away from now: in the link timeout this primary asks to continue alone
        // (`ask_solo_if_due`). A quiet volume reports again at the heartbeat's pace.
        let now = Instant::now();
        if self.peer.borrow().connected {
            self.away_since = Some(now);
        }
        self.timers.report = self.timers.report.min(now + self.witness_period);
        // Checksum requests of the dead link get no answer: a verify pass fails, a resync ends.
        self.crc_asked.clear();
        self.crc_answers.clear();
        if let Some(v) = self.verify.take() {
            let _ = v.reply.send(Err(verify_lost()));
            self.peer.send_modify(|p| p.verify.end());
        }
        self.resync = None;
        self.resync_marks.clear();
        self.peer.send_modify(|v| {
            v.last_error = Some(msg);
            v.connected = false;
            v.in_sync = false;
            v.resync.end();
        });
        self.ops_dirty = true;
    }

    fn depose(&mut self, why: String) {
        if self.deposed.borrow().is_some() {
            return;
        }
        self.peer.send_modify(|v| v.deposed = Some(why.clone()));
        self.deposed.send_replace(Some(why));
    }

    // ---- events ------------------------------------------------------------------------------

    async fn on_event(&mut self, e: Event) {
        match e {
            Event::Frame(generation, f) => {
                let current = matches!(&self.link, LinkState::Up(l) if l.generation == generation);
                if current {
                    if let Err(e) = self.on_frame(f) {
                        self.link_failed(generation, e);
                    }
                }
            }
            Event::LinkDown(generation, e) => self.link_failed(generation, e),
            Event::LinkUp(generation, h) => {
                if matches!(self.link, LinkState::Connecting { generation: g } if g == generation) {
                    self.install(generation, *h);
                }
            }
            Event::ResyncPlan(generation, plan) => {
                let current = matches!(&self.link, LinkState::Up(l) if l.generation == generation);
                if !current || !matches!(self.resync, Some(Resync::Planning)) {
                    return;
                }
                match plan {
                    Ok((ranges, full)) => {
                        let total: u64 = ranges.iter().map(|run| run.bytes().len).sum();
                        self.peer.send_modify(|v| v.resync.bytes_total = total);
                        self.resync = Some(if full {
                            Resync::Compare {
                                windows: windows(&ranges, CRC_WINDOW_BYTES),
                                next_ask: 0,
                                asked: VecDeque::new(),
                                todo: VecDeque::new(),
                                order: LogOrder::default(),
                            }
                        } else {
                            let todo = ranges.iter().map(|run| run.bytes()).collect();
                            Resync::Ship { todo, order: LogOrder::default() }
                        });
                    }
                    Err(e) => self.link_failed(generation, e),
                }
            }
            Event::Witness(ask, r) => self.on_witness(ask, r),
            Event::FloorWritten(floor, r) => {
                self.floor.written(floor, r.is_ok());
                if let Err(e) = r {
                    tracing::warn!(volume = %self.name, "could not record the trim floor: {e}");
                }
            }
        }
    }

    fn on_frame(&mut self, f: Frame) -> Result<()> {
        match f {
            Frame::Ack { applied, durable } => {
                self.lag.durable_through(durable);
                self.peer.send_if_modified(|v| {
                    let changed = applied > v.applied || durable > v.durable;
                    v.applied = v.applied.max(applied);
                    v.durable = v.durable.max(durable);
                    changed
                });
                self.ops_dirty = true;
                self.check_commit();
            }
            Frame::Pong { nonce } => {
                // The permits of the steps it confirms go back to the node.
                while self.resync_marks.front().is_some_and(|(n, _)| *n <= nonce) {
                    self.resync_marks.pop_front();
                }
                self.peer.send_if_modified(|v| {
                    let changed = nonce > v.pong;
                    v.pong = v.pong.max(nonce);
                    changed
                });
                self.check_commit();
            }
            Frame::CrcReply { id, offset, crcs } => match self.crc_asked.remove(&id) {
                Some(asked) if asked.offset == offset && asked.len == crcs.len() as u64 * BLOCK_BYTES_U64 => {
                    self.crc_answers.insert(id, crcs);
                }
                Some(asked) => {
                    let n = asked.len / BLOCK_BYTES_U64;
                    return Err(ReplError::refused(
                        Refusal::Protocol,
                        format!(
                            "checksum reply {id} covers {} blocks at {offset}, asked {n} at {}",
                            crcs.len(),
                            asked.offset
                        ),
                    ));
                }
                // Its asker gave up (a verify pass that failed): nothing waits for it.
                None => {}
            },
            Frame::Refuse { why, reason } => return Err(ReplError::refused(why, format!("peer: {reason}"))),
            other => {
                return Err(ReplError::refused(
                    Refusal::Protocol,
                    format!("unexpected frame from the secondary: {other:?}"),
                ))
            }
        }
        Ok(())
    }

    // ---- invariants and status ----------------------------------------------------------------

    /// What must hold after every step (debug builds: every test and the simulation).
    fn check_invariants(&self) {
        if !cfg!(debug_assertions) {
            return;
        }
        let v = self.peer.borrow();
        assert!(!v.in_sync || (v.connected && self.link_up()), "in sync without a link: {v:?}");
        assert!(!v.solo || self.solo_until.is_some(), "solo without a lease");
        assert!(v.streamed_from <= self.next_tag, "streaming from tag {} ahead of {}", v.streamed_from, self.next_tag);
        assert!(self.resync.is_none() || self.link_up(), "a resync without a link");
        match (&self.verify, &self.link) {
            (None, _) => {}
            (Some(vf), LinkState::Up(l)) => assert_eq!(vf.generation, l.generation, "a verify pass on another link"),
            (Some(_), _) => panic!("a verify pass without a link"),
        }
        assert!(self.crc_asked.is_empty() || self.link_up(), "checksum requests without a link");
        for op in self.ops.values() {
            assert!(
                op.tag < self.next_tag,
                "an operation with tag {} at or past the next tag {}",
                op.tag,
                self.next_tag
            );
        }
    }

    /// Operations in the local log waiting for the peer, and since when the oldest waits.
    fn waiting(&self) -> (usize, Option<Instant>) {
        let waiting = self.ops.values().filter_map(|o| o.local_at.filter(|_| o.peer_at.is_none()));
        waiting.fold((0, None), |(n, t), at: Instant| (n + 1, Some(t.map_or(at, |t: Instant| t.min(at)))))
    }

    /// Publishes the status, at most every `PUBLISH_EVERY` (a timer publishes what changed since).
    fn publish(&mut self) {
        let now = Instant::now();
        if now < self.published_at + PUBLISH_EVERY {
            self.publish_due = true;
            return;
        }
        self.publish_now();
    }

    fn publish_now(&mut self) {
        self.published_at = Instant::now();
        self.publish_due = false;
        let applied = self.peer.borrow().applied;
        let (n, since) = self.waiting();
        let p = Published {
            last_tag: self.next_tag - 1,
            lag_bytes: self.lag.bytes_after(applied),
            lag_since: self.lag.oldest_after(applied),
            witness: self.cfg.authority.as_ref().map(|_| match self.last_witness_error.as_str() {
                "" => Ok(()),
                e => Err(e.to_string()),
            }),
            waiting: n,
            waiting_since: since,
            stages: self.stages,
        };
        self.published.send_if_modified(|cur| {
            if *cur == p {
                false
            } else {
                *cur = p;
                true
            }
        });
    }
}

/// The queued request, or `None` after answering `reply` with why it could not be queued.
fn queued<T>(
    r: syncblock_engine::Result<T>,
    reply: oneshot::Sender<Result<u64>>,
) -> Option<(T, oneshot::Sender<Result<u64>>)> {
    match r {
        Ok(p) => Some((p, reply)),
        Err(e) => {
            let _ = reply.send(Err(e.into()));
            None
        }
    }
}

fn verify_lost() -> ReplError {
    ReplError::Stopped(
        "the link to the peer was lost (or replaced) during verify; run it again once the peer is in sync".into(),
    )
}

/// Dials the peer, says hello, and reads its answer.
async fn handshake(net: &dyn crate::net::Net, peer: SocketAddr, timeout: Duration, hello: &Frame) -> Result<Handshake> {
    let stream = tokio::time::timeout(timeout, net.connect(peer))
        .await
        .map_err(|_| ReplError::Stopped("connect timed out".into()))??;
    let (mut rd, mut wr) = crate::net::split(stream);
    crate::link::write_frame(&mut wr, hello).await?;
    match rd.read_frame(timeout).await? {
        Frame::HelloOk { last_tag, common_tag, runs } => {
            Ok(Handshake { rd, wr, peer_last: last_tag, common: common_tag, runs })
        }
        Frame::Refuse { why, reason } => Err(ReplError::refused(why, format!("peer refused: {reason}"))),
        other => Err(ReplError::refused(Refusal::Protocol, format!("unexpected {other:?} in handshake"))),
    }
}

/// What a resync ships: every block changed after `common` plus the peer's own divergent `runs`,
/// merged; or, when they share nothing, the whole volume (a full sync, by checksums).
async fn plan_resync(
    store: &Store,
    volume: VolumeId,
    size_bytes: u64,
    common: u64,
    runs: Vec<BlockRun>,
) -> Result<(Vec<BlockRun>, bool)> {
    // Everything queued before the link existed must be in the log before the scan reads it.
    store.enqueue_flush().await?.wait().await?;
    let full = common == 0;
    let n_blocks = size_bytes / BLOCK_BYTES_U64;
    let mut all: Vec<BlockRun> = if full {
        vec![BlockRun { lba: Lba(0), n_blocks }]
    } else {
        let changed = store.changed_since(volume, Since::Tag(common)).await?;
        let mut r: Vec<BlockRun> = changed.iter().map(|c| BlockRun { lba: c.lba, n_blocks: c.n_blocks }).collect();
        r.extend(runs);
        r
    };
    all.sort_unstable();
    let mut merged: Vec<BlockRun> = Vec::new();
    for run in all {
        let end = run.end().0.min(n_blocks);
        match merged.last_mut() {
            Some(last) if last.end() >= run.lba => last.n_blocks = last.n_blocks.max(end.saturating_sub(last.lba.0)),
            _ if end > run.lba.0 => merged.push(BlockRun { lba: run.lba, n_blocks: end - run.lba.0 }),
            _ => {}
        }
    }
    Ok((merged, full))
}

#[cfg(test)]
mod tests;
