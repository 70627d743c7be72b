//! The primary side of a replicated volume.
//!
//! Every client write takes the *sequencer* lock, gets the next tag, is queued in the local engine
//! and, in the same critical section, queued on the link to the peer: so the engine's order, the
//! tag order and the link order are one order. The local write and the peer's copy then proceed in
//! parallel, and the client's reply waits for both (the ack rule, `docs/replication.md`).
//!
//! One task owns the connection: it dials the peer, introduces itself, resyncs what the peer lacks
//! and then streams, until the link dies; then it starts again. Resync data is read from the engine
//! through the same sequencer, so a resync read and a concurrent client write reach the peer in the
//! order they reached the local engine.
//!
//! A peer that shares no history (new, replaced, restored from a backup) gets a *full sync* that
//! compares block checksums window by window and ships only the blocks that differ
//! ([`sync_by_checksums`]); [`Primary::verify`] compares both replicas the same way while I/O
//! continues. Both rest on `CrcRequest`, which the peer answers at its place in the stream.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use bytes::{Bytes, BytesMut};
use syncblock_engine::{CommitLoop, Pending, Since, Store, Tag, VolumeId, BLOCK_BYTES, KEEP_LAST_TAG};
use tokio::sync::{mpsc, oneshot, watch};

use crate::link::{read_frame, write_encoded, write_frame};
use crate::state::{ReplState, Role};
use crate::wire::{Frame, Refusal};
use crate::witness::Grant;
use crate::{ReplConfig, ReplError, Result};

/// Frames queued on the link but not yet written. Each holds at most one client write (≤ 32 MiB,
/// bounded further by the NBD layer's in-flight limits) or one resync piece (≤ 1 MiB); when the
/// queue is full, writers wait, which is the backpressure from a slow peer.
const LINK_QUEUE: usize = 256;
/// Resync reads are issued in pieces of at most this much: one engine batch.
const RESYNC_READ_BYTES: u64 = 1 << 20;
/// Block status is asked for windows of this size while resyncing.
const RESYNC_WINDOW_BYTES: u64 = 64 << 20;
/// Trim-floor updates (a meta record each) are written at most this often.
const FLOOR_PERIOD: Duration = Duration::from_secs(5);
/// Full sync and verify compare checksums in windows of this size: 2048 blocks, an 8 KiB answer
/// at most. Small enough that the primary holds its sequencer only briefly per window (one index
/// walk, a few reads queued), large enough that the per-window round trip is negligible.
const CRC_WINDOW_BYTES: u64 = 8 << 20;
/// Checksum requests in flight ahead of the window being compared, so the link keeps shipping
/// while an answer travels back.
const CRC_LOOKAHEAD: usize = 4;
/// Differing ranges a verify report lists; beyond that it only counts blocks.
const VERIFY_RANGES_MAX: usize = 4096;
/// Samples the replication-lag tracker keeps; beyond that it halves its resolution, so the lag in
/// bytes of a peer more than this many writes behind is an over-estimate by at most one gap.
const LAG_SAMPLES_MAX: usize = 1 << 14;
const BB: u64 = BLOCK_BYTES as u64;

/// Progress of a long pass over a volume (a resync or a verify), for `syncblock status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    pub bytes_total: u64,
    /// Bytes examined so far: compared and skipped, trimmed, or shipped.
    pub bytes_done: u64,
    pub started: Option<Instant>,
    /// When the pass finished or failed.
    pub ended: Option<Instant>,
}

impl Progress {
    fn begin(bytes_total: u64) -> Progress {
        Progress { bytes_total, bytes_done: 0, started: Some(Instant::now()), ended: None }
    }

    fn end(&mut self) {
        if self.active() {
            self.ended = Some(Instant::now());
        }
    }

    pub fn active(&self) -> bool {
        self.started.is_some() && self.ended.is_none()
    }

    /// Time spent, up to `now` while running.
    pub fn elapsed_at(&self, now: Instant) -> Duration {
        match self.started {
            Some(s) => self.ended.unwrap_or(now).saturating_duration_since(s),
            None => Duration::ZERO,
        }
    }

    /// Average rate since the start.
    pub fn rate_bytes_per_sec_at(&self, now: Instant) -> u64 {
        let secs = self.elapsed_at(now).as_secs_f64();
        if secs > 0.0 {
            (self.bytes_done as f64 / secs) as u64
        } else {
            0
        }
    }

    /// Time left at the average rate; None when not running or nothing is done yet.
    pub fn eta_at(&self, now: Instant) -> Option<Duration> {
        let rate = self.rate_bytes_per_sec_at(now);
        (self.active() && rate > 0)
            .then(|| Duration::from_secs_f64(self.bytes_total.saturating_sub(self.bytes_done) as f64 / rate as f64))
    }

    /// The fields of a JSON object, without its braces (`rate_bytes_per_sec`, `eta_secs` as of
    /// now), for callers that add their own.
    pub fn json_fields(&self) -> String {
        let now = Instant::now();
        let eta = match self.eta_at(now) {
            Some(d) => format!("{:.1}", d.as_secs_f64()),
            None => "null".into(),
        };
        format!(
            "\"active\":{},\"bytes_total\":{},\"bytes_done\":{},\"elapsed_secs\":{:.3},\"rate_bytes_per_sec\":{},\"eta_secs\":{}",
            self.active(),
            self.bytes_total,
            self.bytes_done,
            self.elapsed_at(now).as_secs_f64(),
            self.rate_bytes_per_sec_at(now),
            eta
        )
    }
}

/// What a verify pass found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub bytes_compared: u64,
    /// Blocks whose checksum or mapping differs between the replicas.
    pub blocks_differing: u64,
    /// The differing ranges as (byte offset, byte length), in order, merged; at most
    /// `VERIFY_RANGES_MAX` of them (`ranges_truncated` says when more were found).
    pub ranges: Vec<(u64, u64)>,
    pub ranges_truncated: bool,
    /// Blocks rewritten (or trimmed) on the peer from the primary's copy, with `repair`.
    pub blocks_repaired: u64,
    pub elapsed: Duration,
}

impl VerifyReport {
    pub fn to_json(&self) -> String {
        let ranges: Vec<String> = self.ranges.iter().map(|(o, l)| format!("[{o},{l}]")).collect();
        format!(
            "{{\"bytes_compared\":{},\"blocks_differing\":{},\"ranges\":[{}],\"ranges_truncated\":{},\"blocks_repaired\":{},\"elapsed_secs\":{:.3}}}",
            self.bytes_compared,
            self.blocks_differing,
            ranges.join(","),
            self.ranges_truncated,
            self.blocks_repaired,
            self.elapsed.as_secs_f64()
        )
    }
}

/// What the primary knows of its peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerView {
    pub connected: bool,
    /// Resync finished: the peer is a consistent, up-to-date copy, and RPO = 0 holds.
    pub in_sync: bool,
    /// Every tag up to this is in the peer's log.
    pub applied: u64,
    /// Every tag up to this is durable on the peer.
    pub durable: u64,
    /// The newest ping the peer answered (nonces increase for the primary's lifetime).
    pub pong: u64,
    pub last_error: Option<String>,
    /// The current (or last) resync: its `bytes_total` is the ranges it covers.
    pub resync: Progress,
    /// The current (or last) resync is a full sync (no shared history), comparing checksums.
    pub resync_full: bool,
    /// Data bytes the resync shipped, and bytes it skipped because the peer's checksums matched.
    pub resync_bytes_shipped: u64,
    pub resync_bytes_skipped: u64,
    pub resyncs: u64,
    /// The current (or last) verify pass, and the last completed one's findings.
    pub verify: Progress,
    pub last_verify: Option<VerifyReport>,
    /// First tag streamed on the current link. Older tags reach the peer through the resync, so
    /// until it commits only writes from here on can be confirmed.
    pub streamed_from: u64,
    /// The witness consented to acknowledging writes without the peer (`degrade` policy).
    pub solo: bool,
    /// Another node holds the primary role in a newer epoch: this one must stop.
    pub deposed: Option<String>,
}

impl PeerView {
    /// Whether an operation with `tag` may complete: the peer has it in its log (and, for a
    /// durable one, on stable storage, with no half-finished resync before it).
    pub fn confirms(&self, tag: u64, durable: bool) -> bool {
        if self.solo {
            return true;
        }
        if durable {
            self.in_sync && self.durable >= tag
        } else {
            self.applied >= tag && (self.in_sync || (self.connected && tag >= self.streamed_from))
        }
    }
}

/// A snapshot for `syncblock status`.
#[derive(Debug, Clone)]
pub struct PrimaryStatus {
    pub volume: String,
    pub epoch: u64,
    pub policy: crate::Policy,
    /// Client operations waiting for the peer's confirmation, and how long the oldest has waited.
    pub waiting: usize,
    pub waiting_oldest: Option<Duration>,
    pub last_tag: u64,
    /// Bytes of writes the peer does not have in its log yet (see `Lag`).
    pub lag_bytes: u64,
    pub peer: PeerView,
}

impl PrimaryStatus {
    /// Writes the primary holds that its peer does not have in its log yet.
    pub fn lag_tags(&self) -> u64 {
        self.last_tag.saturating_sub(self.peer.applied)
    }

    /// Whether every acknowledged write is on both nodes right now.
    pub fn rpo_zero(&self) -> bool {
        self.peer.connected && self.peer.in_sync && !self.peer.solo
    }
}

enum Out {
    Frame(Frame),
    /// Resync data (or a verify repair, `resync: false`): the engine read was queued in sequencer
    /// order; its bytes follow when ready.
    Read {
        tag: u64,
        offset: u64,
        read: Pending<Bytes>,
        resync: bool,
    },
}

struct Seq {
    next_tag: u64,
    link: Option<mpsc::Sender<Out>>,
    /// Bumped each time a link is installed: a verify pass must end on the link it started on.
    link_gen: u64,
    /// Client writes against flushes: while a client commits write by write, each write is
    /// shipped as FUA, so the peer makes it durable as it lands and its ack already covers the
    /// flush that follows, which then needs no frame and no round trip.
    commit_loop: CommitLoop,
}

/// A `CrcRequest` waiting for its answer.
struct CrcWaiter {
    offset: u64,
    n_blocks: usize,
    tx: oneshot::Sender<Vec<Option<u32>>>,
}

/// Bytes of writes the peer lacks: cumulative write bytes sampled by tag, so the lag in bytes is
/// the total minus the cumulative count at the peer's applied tag. Samples are dropped once the
/// peer has them durably (it never goes back below that, even across a reconnection). Exact while
/// the peer is fewer than `LAG_SAMPLES_MAX` writes behind; beyond, samples are `stride` tags
/// apart and the figure over-estimates by at most that many writes.
struct Lag {
    /// (tag, cumulative bytes through that tag), increasing.
    samples: VecDeque<(u64, u64)>,
    /// Cumulative bytes through the last dropped sample.
    base: u64,
    total: u64,
    /// Tags one sample may span.
    stride: u64,
}

impl Default for Lag {
    fn default() -> Lag {
        Lag { samples: VecDeque::new(), base: 0, total: 0, stride: 1 }
    }
}

impl Lag {
    fn wrote(&mut self, tag: u64, bytes: u64) {
        self.total += bytes;
        let n = self.samples.len();
        if n >= 2 && self.samples[n - 1].0 - self.samples[n - 2].0 < self.stride {
            // The newest sample still spans less than a stride: it moves up to this write.
            self.samples[n - 1] = (tag, self.total);
        } else {
            self.samples.push_back((tag, self.total));
        }
        if self.samples.len() > LAG_SAMPLES_MAX {
            // Every second sample (and the newest) stays: half the resolution, never an
            // under-estimate.
            let last = self.samples.len() - 1;
            let kept: VecDeque<_> =
                self.samples.iter().enumerate().filter(|(k, _)| k % 2 == 1 || *k == last).map(|(_, s)| *s).collect();
            self.samples = kept;
            self.stride *= 2;
        }
    }

    fn durable_through(&mut self, tag: u64) {
        while let Some(&(t, cum)) = self.samples.front() {
            if t > tag {
                break;
            }
            self.base = cum;
            self.samples.pop_front();
        }
        if self.samples.is_empty() {
            self.stride = 1;
        }
    }

    fn bytes_after(&self, applied: u64) -> u64 {
        let k = self.samples.partition_point(|&(t, _)| t <= applied);
        let through = if k == 0 { self.base } else { self.samples[k - 1].1 };
        self.total - through
    }
}

impl Seq {
    /// Queues on the link if there is one; a link that has gone away is forgotten (its task
    /// notices too and reconnects).
    async fn ship(&mut self, out: Out) {
        if let Some(link) = &self.link {
            if link.send(out).await.is_err() {
                self.link = None;
            }
        }
    }
}

struct Inner {
    store: Store,
    volume: VolumeId,
    name: String,
    size_bytes: u64,
    peer_addr: SocketAddr,
    cfg: ReplConfig,
    seq: tokio::sync::Mutex<Seq>,
    peer: watch::Sender<PeerView>,
    state: Mutex<ReplState>,
    /// Highest tag made durable locally by a completed flush.
    local_durable: Mutex<u64>,
    /// Until when solo operation is valid: one timeout after the last request the witness
    /// answered. Past it, solo ends and writes wait again.
    solo_until: Mutex<Option<Instant>>,
    stop: watch::Sender<bool>,
    /// Ordered, so that dropping them all wakes their tasks in a reproducible order.
    crc_waiters: Mutex<BTreeMap<u64, CrcWaiter>>,
    next_crc_id: AtomicU64,
    /// Nonces of pings: heartbeats, and the one that confirms a resync commit.
    next_nonce: AtomicU64,
    /// One verify pass at a time.
    verifying: tokio::sync::Mutex<()>,
    lag: Mutex<Lag>,
    /// Client operations waiting for the peer, by a serial in start order, with their start.
    waiting: Mutex<BTreeMap<u64, Instant>>,
    next_waiter: AtomicU64,
}

/// Log a warning while client operations have waited this long for the peer, and again every
/// `WAIT_WARN_EVERY` while they still wait: under the strict policy (or without the witness's
/// consent to go on alone) a write waits for the peer for as long as it is away.
const WAIT_WARN_AFTER: Duration = Duration::from_secs(2);
const WAIT_WARN_EVERY: Duration = Duration::from_secs(10);

/// Removes a waiting operation from `Inner::waiting` however its wait ends.
struct Waiting<'a>(&'a Inner, u64);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.lock().expect("waiting").remove(&self.1);
    }
}

/// The primary of one replicated volume. Cheap to clone.
#[derive(Clone)]
pub struct Primary {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Primary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Primary").field("volume", &self.inner.name).finish_non_exhaustive()
    }
}

impl Primary {
    /// Takes the primary role for `volume` and starts replicating to `peer_addr`. A node that is
    /// not primary yet starts a new epoch: `granted` (by the witness), or its last epoch + 1 when
    /// there is no witness. Must run inside a tokio runtime.
    pub async fn start(
        store: Store,
        volume_name: &str,
        peer_addr: SocketAddr,
        cfg: ReplConfig,
        granted: Option<Grant>,
    ) -> Result<Primary> {
        let info = store.volume(volume_name).await?;
        let mut state = ReplState::decode(&info.attr).unwrap_or_else(|| ReplState::new(Role::Primary));
        // Every start is a new epoch: after a crash this node may have lost tags its peer holds, and
        // must never assign the same (epoch, tag) to a different write.
        {
            if !crate::state::consistent_replica(&info) {
                return Err(ReplError::Invalid(format!(
                    "volume {volume_name} holds a half-applied resync; it cannot become primary: \
                     resync it from its peer first"
                )));
            }
            let epoch = granted.as_ref().map_or(state.epoch + 1, |g| g.epoch);
            if epoch <= state.epoch {
                return Err(ReplError::Invalid(format!(
                    "granted epoch {epoch} is not newer than this node's epoch {}",
                    state.epoch
                )));
            }
            state.begin_epoch(epoch, info.last_tag + 1, crate::wire::new_origin());
            if state.pair == 0 {
                // The pair's first primary names the pair; its secondary takes the id at the
                // first sync, and the witness keys its record by it.
                state.pair = crate::wire::new_origin();
            }
            tracing::info!(
                volume = volume_name,
                epoch,
                pair = format!("{:016x}", state.pair),
                "taking the primary role"
            );
        }
        // Retain trims until the peer confirms it has them (the floor rises as it does). An
        // interrupted resync this node was receiving is dropped: its committed image is what it
        // serves.
        let floor = info.trim_floor.min(info.last_tag);
        state.consistent = true;
        store
            .set_repl_staged(info.id, KEEP_LAST_TAG, floor, state.encode(), syncblock_engine::StagedOp::Discard)
            .await?;
        // What the peer holds is unknown until it connects; counting what this node held at the
        // start as applied keeps `lag_tags` meaningful (acknowledgements only concern newer tags).
        let solo_until = granted
            .as_ref()
            .filter(|g| g.solo && cfg.policy == crate::Policy::Degrade && cfg.witness.is_some())
            .map(|g| g.valid_until);
        let solo_from_grant = solo_until.is_some_and(|t| Instant::now() < t);
        let (peer, _) =
            watch::channel(PeerView { applied: info.last_tag, solo: solo_from_grant, ..PeerView::default() });
        let (stop, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            store,
            volume: info.id,
            name: volume_name.to_string(),
            size_bytes: info.size_bytes,
            peer_addr,
            cfg,
            seq: tokio::sync::Mutex::new(Seq {
                next_tag: info.last_tag + 1,
                link: None,
                link_gen: 0,
                commit_loop: CommitLoop::default(),
            }),
            peer,
            state: Mutex::new(state),
            local_durable: Mutex::new(0),
            solo_until: Mutex::new(solo_until),
            stop,
            crc_waiters: Mutex::new(BTreeMap::new()),
            next_crc_id: AtomicU64::new(1),
            next_nonce: AtomicU64::new(0),
            verifying: tokio::sync::Mutex::new(()),
            lag: Mutex::new(Lag::default()),
            waiting: Mutex::new(BTreeMap::new()),
            next_waiter: AtomicU64::new(0),
        });
        tokio::spawn(run_links(inner.clone()));
        tokio::spawn(run_floor(inner.clone(), floor));
        tokio::spawn(warn_while_waiting(inner.clone()));
        if let Some(w) = inner.cfg.witness {
            tokio::spawn(run_witness_reports(inner.clone(), w));
        }
        Ok(Primary { inner })
    }

    pub fn volume(&self) -> VolumeId {
        self.inner.volume
    }

    /// Stops replicating: operations waiting for the peer fail.
    pub fn stop(&self) {
        let _ = self.inner.stop.send(true);
    }

    /// Resolves when this primary has been deposed (a newer epoch exists), with the reason.
    pub async fn deposed(&self) -> String {
        let mut w = self.inner.peer.subscribe();
        let why = match w.wait_for(|v| v.deposed.is_some()).await {
            Ok(v) => v.deposed.clone().unwrap_or_default(),
            Err(_) => "primary dropped".into(),
        };
        why
    }

    /// Resolves when this primary is stopped or deposed.
    pub async fn stopped(&self) {
        let mut stop = self.inner.stop.subscribe();
        let mut peer = self.inner.peer.subscribe();
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => {}
            _ = peer.wait_for(|v| v.deposed.is_some()) => {}
        }
    }

    /// Marks this primary deposed (a newer epoch exists): waiting and new writes fail.
    pub fn depose(&self, why: String) {
        self.inner.peer.send_modify(|v| {
            if v.deposed.is_none() {
                v.deposed = Some(why);
            }
        });
    }

    /// Whether both handles are the same primary (not merely of the same volume).
    pub fn same(&self, other: &Primary) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    pub fn epoch(&self) -> u64 {
        self.inner.state.lock().expect("state").epoch
    }

    /// The pair's id (see [`ReplState::pair`]).
    pub fn pair(&self) -> u64 {
        self.inner.state.lock().expect("state").pair
    }

    pub async fn status(&self) -> PrimaryStatus {
        let last_tag = self.inner.seq.lock().await.next_tag - 1;
        let peer = self.inner.peer.borrow().clone();
        let (waiting, waiting_oldest) = {
            let w = self.inner.waiting.lock().expect("waiting");
            (w.len(), w.values().next().map(|t| t.elapsed()))
        };
        PrimaryStatus {
            volume: self.inner.name.clone(),
            epoch: self.inner.state.lock().expect("state").epoch,
            policy: self.inner.cfg.policy,
            waiting,
            waiting_oldest,
            last_tag,
            lag_bytes: self.inner.lag.lock().expect("lag").bytes_after(peer.applied),
            peer,
        }
    }

    /// A watch on the peer's state (for tests and status).
    pub fn peer_view(&self) -> watch::Receiver<PeerView> {
        self.inner.peer.subscribe()
    }

    fn check_role(&self) -> Result<()> {
        match &self.inner.peer.borrow().deposed {
            Some(why) => Err(ReplError::Stopped(format!("deposed: {why}"))),
            None if *self.inner.stop.borrow() => Err(ReplError::Stopped("replication stopped".into())),
            None => Ok(()),
        }
    }

    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.write_tagged(offset, data, fua).await.map(|_| ())
    }

    /// [`Primary::write`], returning the write's tag: its place in the volume's history.
    pub async fn write_tagged(&self, offset: u64, data: Bytes, fua: bool) -> Result<u64> {
        self.check_role()?;
        let i = &self.inner;
        let (pending, tag) = {
            let mut seq = i.seq.lock().await;
            let tag = seq.next_tag;
            let p = i.store.enqueue_write(i.volume, offset, data.clone(), fua, Tag::seq(tag)).await?;
            seq.next_tag += 1;
            i.lag.lock().expect("lag").wrote(tag, data.len() as u64);
            seq.commit_loop.note_write();
            let peer_fua = fua || seq.commit_loop.flush_expected();
            seq.ship(Out::Frame(Frame::Write { tag, offset, fua: peer_fua, data })).await;
            (p, tag)
        };
        pending.wait().await?;
        self.wait_peer(tag, fua).await?;
        Ok(tag)
    }

    pub async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.check_role()?;
        let i = &self.inner;
        let (pending, tag) = {
            let mut seq = i.seq.lock().await;
            let tag = seq.next_tag;
            let p = i.store.enqueue_trim(i.volume, offset, len, Tag::seq(tag)).await?;
            seq.next_tag += 1;
            seq.ship(Out::Frame(Frame::Trim { tag, offset, len })).await;
            (p, tag)
        };
        pending.wait().await?;
        self.wait_peer(tag, false).await
    }

    pub async fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> Result<()> {
        self.check_role()?;
        let i = &self.inner;
        let (pending, tag) = {
            let mut seq = i.seq.lock().await;
            let tag = seq.next_tag;
            let p = i.store.enqueue_write_zeroes(i.volume, offset, len, may_trim, fua, Tag::seq(tag)).await?;
            seq.next_tag += 1;
            seq.ship(Out::Frame(Frame::Zeroes { tag, offset, len, may_trim, fua })).await;
            (p, tag)
        };
        pending.wait().await?;
        self.wait_peer(tag, fua).await
    }

    /// Makes every write completed before the call durable on both nodes.
    pub async fn flush(&self) -> Result<()> {
        self.check_role()?;
        let i = &self.inner;
        let (pending, upto) = {
            let mut seq = i.seq.lock().await;
            let upto = seq.next_tag - 1;
            let p = i.store.enqueue_flush().await?;
            seq.commit_loop.note_flush();
            // A peer that already has everything durably (see `Seq::commit_loop`) needs no frame.
            if !i.peer.borrow().confirms(upto, true) {
                seq.ship(Out::Frame(Frame::Flush { upto })).await;
            }
            (p, upto)
        };
        pending.wait().await?;
        {
            let mut d = i.local_durable.lock().expect("durable");
            *d = (*d).max(upto);
        }
        self.wait_peer(upto, true).await
    }

    /// Compares both replicas block by block, by the checksums each engine keeps in its index,
    /// while I/O continues, and reports the ranges that differ; with `repair`, also rewrites them
    /// on the peer from the primary's copy. Needs a connected peer in sync; fails if the link is
    /// lost (or replaced) during the pass.
    ///
    /// Each window is compared at one point of the order: under the sequencer, the primary queues
    /// a checksum request in its own engine and a `CrcRequest` on the link, back to back. The
    /// primary's answer is its image after every operation queued before that point; the peer's
    /// is its image after every frame before the request: the same operations in the same order,
    /// since an in-sync peer holds the whole history before the link and the link carries the
    /// sequencer's order. A write racing with the pass lands on the same side of that point on
    /// both nodes, so it never shows as a difference.
    pub async fn verify(&self, repair: bool) -> Result<VerifyReport> {
        self.check_role()?;
        let i = &self.inner;
        let Ok(_one) = i.verifying.try_lock() else {
            return Err(ReplError::Invalid("a verify pass is already running".into()));
        };
        let link_gen = {
            let seq = i.seq.lock().await;
            let in_sync = {
                let v = i.peer.borrow();
                v.connected && v.in_sync
            };
            if seq.link.is_none() || !in_sync {
                return Err(ReplError::Invalid(
                    "verify needs a connected peer in sync; wait for the resync to finish (see `syncblock status`)"
                        .into(),
                ));
            }
            seq.link_gen
        };
        i.peer.send_modify(|v| v.verify = Progress::begin(i.size_bytes));
        let r = verify_windows(i, link_gen, repair).await;
        i.peer.send_modify(|v| {
            v.verify.end();
            if let Ok(report) = &r {
                v.last_verify = Some(report.clone());
            }
        });
        match &r {
            Ok(report) => tracing::info!(
                volume = %i.name,
                differing_blocks = report.blocks_differing,
                repaired = report.blocks_repaired,
                secs = report.elapsed.as_secs_f64(),
                "verify pass done"
            ),
            Err(e) => tracing::warn!(volume = %i.name, "verify pass failed: {e}"),
        }
        r
    }

    /// Waits until the peer has `tag` in its log (and durable, with `durable`). Under the strict
    /// policy this waits through disconnections: the write completes once the peer is back and
    /// resynced, and never before.
    async fn wait_peer(&self, tag: u64, durable: bool) -> Result<()> {
        if self.inner.peer.borrow().confirms(tag, durable) {
            return Ok(());
        }
        let serial = self.inner.next_waiter.fetch_add(1, Ordering::Relaxed);
        self.inner.waiting.lock().expect("waiting").insert(serial, Instant::now());
        let _waiting = Waiting(&self.inner, serial);
        let mut peer = self.inner.peer.subscribe();
        let mut stop = self.inner.stop.subscribe();
        tokio::select! {
            biased;
            r = peer.wait_for(|v| v.confirms(tag, durable) || v.deposed.is_some()) => {
                let v = r.map_err(|_| ReplError::Stopped("primary shut down".into()))?;
                match &v.deposed {
                    Some(why) => Err(ReplError::Stopped(format!("deposed: {why}"))),
                    None => Ok(()),
                }
            }
            _ = stop.wait_for(|s| *s) => Err(ReplError::Stopped("replication stopped before the peer confirmed".into())),
        }
    }
}

/// Keeps a link to the peer up: connect, hello, resync, stream; again after every failure.
async fn run_links(i: Arc<Inner>) {
    let mut stop = i.stop.subscribe();
    let mut last_error = String::new();
    loop {
        if *stop.borrow() {
            return;
        }
        let r = tokio::select! {
            biased;
            r = one_link(&i) => r,
            _ = stop.wait_for(|s| *s) => {
                // A verify pass waiting for the peer's checksums fails instead of hanging.
                i.crc_waiters.lock().expect("crc waiters").clear();
                return;
            }
        };
        if let Err(e) = r {
            let msg = e.to_string();
            if let Some(Refusal::Deposed { epoch }) = e.refusal() {
                // Only a newer epoch proves a successor: anything else is a failed link.
                let mine = i.state.lock().expect("state").epoch;
                if epoch > mine {
                    tracing::error!(volume = %i.name, "deposed: the peer has seen epoch {epoch} (this node's is {mine}): {msg}");
                    i.peer.send_modify(|v| v.deposed = Some(msg.clone()));
                }
            }
            if msg != last_error {
                tracing::warn!(volume = %i.name, peer = %i.peer_addr, "replication link: {msg}");
                last_error = msg.clone();
            }
            i.peer.send_modify(|v| v.last_error = Some(msg));
        }
        i.seq.lock().await.link = None;
        // Checksum requests of the dead link get no answer: their waiters see the link lost.
        i.crc_waiters.lock().expect("crc waiters").clear();
        i.peer.send_modify(|v| {
            v.connected = false;
            v.in_sync = false;
            v.resync.end();
        });
        if i.peer.borrow().deposed.is_some() {
            return;
        }
        tokio::time::sleep(i.cfg.reconnect).await;
    }
}

/// Whether a witness refusal proves this primary was deposed: only a newer epoch held by another
/// node does. Anything else (the witness failing to record its state, a protocol error, a witness
/// that lost its records) is treated like a witness that cannot be reached: it grants nothing, so
/// a solo lease runs out, but it deposes nobody.
fn deposed_by(i: &Inner, e: &ReplError) -> Option<String> {
    match e.refusal() {
        Some(Refusal::Deposed { epoch }) if epoch > i.state.lock().expect("state").epoch => Some(e.to_string()),
        _ => None,
    }
}

/// Reports to the witness every heartbeat; learns there if it was deposed; under the `degrade`
/// policy asks to continue alone once the peer has been away for the timeout.
async fn run_witness_reports(i: Arc<Inner>, witness: SocketAddr) {
    let mut stop = i.stop.subscribe();
    let mut away_since: Option<Instant> = None;
    let mut last_error = String::new();
    let mut first = true;
    // Reports renew the lease: at least four per lease, whatever the heartbeat.
    let mut period = i.cfg.heartbeat;
    loop {
        if !first {
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(period) => {}
            }
        }
        first = false;
        let (in_sync, connected, solo) = {
            let v = i.peer.borrow();
            (v.in_sync, v.connected, v.solo)
        };
        if in_sync && solo {
            // The peer has everything again: back to confirming every write with it, before the
            // witness hears that the pair is in sync.
            i.peer.send_modify(|v| v.solo = false);
        }
        let (epoch, pair) = {
            let s = i.state.lock().expect("state");
            (s.epoch, s.pair)
        };
        let report = Frame::WitnessReport { pair, volume: i.name.clone(), node: i.cfg.node.clone(), epoch, in_sync };
        match crate::witness::ask(i.cfg.net.as_ref(), witness, &report, i.cfg.timeout).await {
            Ok(grant) => {
                last_error.clear();
                period = i.cfg.heartbeat.min(grant.lease / 4).max(Duration::from_millis(5));
                // Solo operation is a lease: valid for the witness's lease from the last request
                // it answered (counted from when it was sent, so it ends before the witness,
                // counting from when it received it, would let anyone take over).
                *i.solo_until.lock().expect("solo") = Some(grant.valid_until);
            }
            Err(e) => {
                if let Some(why) = deposed_by(&i, &e) {
                    tracing::error!(volume = %i.name, "the witness says this primary was deposed: {why}");
                    i.peer.send_modify(|v| v.deposed = Some(why));
                    return;
                }
                let msg = match e.refusal() {
                    Some(_) => format!("the witness refuses ({e}); treated as unreachable"),
                    None => format!("witness unreachable: {e}"),
                };
                if msg != last_error {
                    tracing::warn!(volume = %i.name, "{msg}");
                    last_error = msg;
                }
            }
        }
        let lease_over = i.solo_until.lock().expect("solo").is_none_or(|t| Instant::now() >= t);
        if i.peer.borrow().solo && lease_over {
            tracing::error!(volume = %i.name, "solo lease expired (witness unreachable): writes wait for the peer or the witness");
            i.peer.send_modify(|v| v.solo = false);
        }
        away_since = if connected { None } else { away_since.or(Some(Instant::now())) };
        let away_long = away_since.is_some_and(|t| t.elapsed() >= i.cfg.timeout);
        if i.cfg.policy == crate::Policy::Degrade && away_long && !i.peer.borrow().solo {
            let req = Frame::WitnessSolo { pair, volume: i.name.clone(), node: i.cfg.node.clone(), epoch };
            match crate::witness::ask(i.cfg.net.as_ref(), witness, &req, i.cfg.timeout).await {
                Ok(grant) if Instant::now() < grant.valid_until => {
                    *i.solo_until.lock().expect("solo") = Some(grant.valid_until);
                    tracing::warn!(volume = %i.name, "peer away: continuing alone with the witness's consent (RPO > 0 until it resyncs)");
                    i.peer.send_modify(|v| v.solo = true);
                }
                Ok(_) => tracing::warn!(volume = %i.name, "the witness's solo grant arrived after its lease ran out"),
                Err(e) => {
                    if let Some(why) = deposed_by(&i, &e) {
                        tracing::error!(volume = %i.name, "the witness refuses solo operation: {why}");
                        i.peer.send_modify(|v| v.deposed = Some(why));
                        return;
                    }
                    tracing::warn!(volume = %i.name, "no solo operation: {e}");
                }
            }
        }
    }
}

/// Logs while client operations wait for the peer: how many, since when, and why.
async fn warn_while_waiting(i: Arc<Inner>) {
    let mut stop = i.stop.subscribe();
    let mut warned: Option<Instant> = None;
    loop {
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let (n, oldest) = {
            let w = i.waiting.lock().expect("waiting");
            (w.len(), w.values().next().map(|t| t.elapsed()))
        };
        let Some(oldest) = oldest.filter(|o| *o >= WAIT_WARN_AFTER) else {
            warned = None;
            continue;
        };
        if warned.is_some_and(|t| t.elapsed() < WAIT_WARN_EVERY) {
            continue;
        }
        warned = Some(Instant::now());
        let v = i.peer.borrow().clone();
        let why = match (i.cfg.policy, v.connected) {
            (_, true) => "the peer is resyncing",
            (crate::Policy::Strict, false) => {
                "the peer is away and the policy is strict: they complete when it is back"
            }
            (crate::Policy::Degrade, false) => "the peer is away and the witness has not granted solo operation",
        };
        tracing::warn!(
            volume = %i.name,
            "{n} client operations waiting for the peer, the oldest for {:.1} s ({why}; `syncblock status` shows it)",
            oldest.as_secs_f64()
        );
    }
}

async fn one_link(i: &Arc<Inner>) -> Result<()> {
    let stream = tokio::time::timeout(i.cfg.timeout, i.cfg.net.connect(i.peer_addr))
        .await
        .map_err(|_| ReplError::Stopped("connect timed out".into()))??;
    let (mut rd, mut wr) = crate::net::split(stream);
    let (pair, epoch, history) = {
        let s = i.state.lock().expect("state");
        (s.pair, s.epoch, s.history.clone())
    };
    let last_tag = i.seq.lock().await.next_tag - 1;
    let hello = Frame::Hello {
        pair,
        epoch,
        last_tag,
        size_bytes: i.size_bytes,
        volume: i.name.clone(),
        node: i.cfg.node.clone(),
        history: history.clone(),
    };
    write_frame(&mut wr, &hello).await?;
    let (peer_last, common, runs) = match read_frame(&mut rd, i.cfg.timeout).await? {
        Frame::HelloOk { last_tag, common_tag, runs } => (last_tag, common_tag, runs),
        Frame::Refuse { why, reason } => return Err(ReplError::refused(why, format!("peer refused: {reason}"))),
        other => return Err(ReplError::refused(Refusal::Protocol, format!("unexpected {other:?} in handshake"))),
    };
    tracing::info!(volume = %i.name, peer = %i.peer_addr, peer_last, common, "peer connected; resyncing");
    i.peer.send_modify(|v| {
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
    });

    // From here on every client write is streamed as well.
    let (tx, rx) = mpsc::channel(LINK_QUEUE);
    {
        let mut seq = i.seq.lock().await;
        seq.link = Some(tx.clone());
        seq.link_gen += 1;
        let from = seq.next_tag;
        i.peer.send_modify(|v| v.streamed_from = from);
        seq.ship(Out::Frame(Frame::ResyncBegin { common_tag: common })).await;
    }
    // Aborted when this function's future is dropped (the primary stopping), so the link closes.
    let writer = AbortOnDrop(tokio::spawn(write_loop(i.clone(), wr, rx)));
    let reader = AbortOnDrop(tokio::spawn(read_loop(i.clone(), rd)));
    let resync = resync(i, common, runs, epoch, history);
    tokio::pin!(resync);
    let mut writer = writer;
    let mut reader = reader;
    let mut resync_done = false;
    loop {
        tokio::select! {
            biased;
            r = &mut writer.0 => return r.map_err(|e| ReplError::Stopped(e.to_string()))?,
            r = &mut reader.0 => return r.map_err(|e| ReplError::Stopped(e.to_string()))?,
            r = &mut resync, if !resync_done => {
                resync_done = true;
                r?;
            }
        }
    }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Ships what the peer lacks: every block changed after `common` plus the peer's own divergent
/// `runs`; or, when they share nothing, the whole volume by comparing checksums
/// ([`sync_by_checksums`]). Then commits.
async fn resync(
    i: &Arc<Inner>,
    common: u64,
    runs: Vec<(u64, u64)>,
    epoch: u64,
    history: Vec<crate::wire::EpochStart>,
) -> Result<()> {
    let started = Instant::now();
    // Everything queued before the link existed must be in the log before the scan reads it.
    i.store.enqueue_flush().await?.wait().await?;
    let full = common == 0;
    let mut ranges: Vec<(u64, u64)> = if full {
        vec![(0, i.size_bytes / BB)]
    } else {
        let mut r: Vec<(u64, u64)> =
            i.store.changed_since(i.volume, Since::Tag(common)).await?.iter().map(|c| (c.lba.0, c.n_blocks)).collect();
        r.extend(runs);
        r
    };
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (lba, n) in ranges {
        let end = (lba + n).min(i.size_bytes / BB);
        match merged.last_mut() {
            Some((l, m)) if *l + *m >= lba => *m = (*m).max(end.saturating_sub(*l)),
            _ if end > lba => merged.push((lba, end - lba)),
            _ => {}
        }
    }
    let total: u64 = merged.iter().map(|(_, n)| n * BB).sum();
    i.peer.send_modify(|v| v.resync.bytes_total = total);
    if full {
        sync_by_checksums(i, &windows(&merged, CRC_WINDOW_BYTES)).await?;
    } else {
        for (at, len) in windows(&merged, RESYNC_WINDOW_BYTES) {
            let mut seq = i.seq.lock().await;
            if seq.link.is_none() {
                return Err(ReplError::Stopped("link lost during resync".into()));
            }
            let tag = seq.next_tag - 1;
            // Asked under the sequencer lock: the answer is the state at this point of the order.
            let extents = i.store.block_status(i.volume, at, len).await?;
            let mut trimmed = 0;
            for e in extents {
                if e.mapped {
                    queue_reads(i, &mut seq, tag, e.offset, e.len, true).await?;
                } else {
                    seq.ship(Out::Frame(Frame::Trim { tag, offset: e.offset, len: e.len })).await;
                    trimmed += e.len;
                }
            }
            drop(seq);
            i.peer.send_modify(|v| v.resync.bytes_done += trimmed);
        }
    }
    let (commit, nonce) = {
        let mut seq = i.seq.lock().await;
        let tag = seq.next_tag - 1;
        seq.ship(Out::Frame(Frame::ResyncCommit { tag, epoch, history })).await;
        // The peer answers pings in stream order, after applying everything before them: the pong
        // to this one proves the commit applied. (`applied >= tag` alone cannot: when nothing was
        // written since the common point, the peer reported that tag before the resync began.)
        let nonce = i.next_nonce.fetch_add(1, Ordering::Relaxed) + 1;
        seq.ship(Out::Frame(Frame::Ping { epoch, nonce, floor: floor_tag(i) })).await;
        if seq.link.is_none() {
            return Err(ReplError::Stopped("link lost during resync".into()));
        }
        (tag, nonce)
    };
    let mut peer = i.peer.subscribe();
    peer.wait_for(|v| !v.connected || (v.applied >= commit && v.pong >= nonce))
        .await
        .map_err(|_| ReplError::Stopped("shut down".into()))?;
    if !peer.borrow().connected {
        return Err(ReplError::Stopped("link lost before the resync committed".into()));
    }
    let secs = started.elapsed().as_secs_f64();
    let (shipped, skipped) = {
        let v = i.peer.borrow();
        (v.resync_bytes_shipped, v.resync_bytes_skipped)
    };
    tracing::info!(volume = %i.name, bytes = total, shipped, skipped, full, secs, "resync committed at tag {commit}; peer in sync");
    i.peer.send_modify(|v| {
        v.in_sync = true;
        // The peer has everything: every write is confirmed by it again (the witness hears that
        // the pair is in sync at the next report, which clears its solo mark).
        v.solo = false;
        v.resync.bytes_done = total;
        v.resync.end();
    });
    Ok(())
}

/// Splits LBA runs into byte windows of at most `window_bytes`.
fn windows(runs: &[(u64, u64)], window_bytes: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(lba, n) in runs {
        let (mut at, end) = (lba * BB, (lba + n) * BB);
        while at < end {
            let len = (end - at).min(window_bytes);
            out.push((at, len));
            at += len;
        }
    }
    out
}

/// Queues engine reads of `[offset, offset + len)` (in pieces of at most `RESYNC_READ_BYTES`) and
/// their frames on the link. The caller holds the sequencer, so the reads see exactly the writes
/// queued before this point of the order, as the peer will have applied them.
async fn queue_reads(i: &Inner, seq: &mut Seq, tag: u64, offset: u64, len: u64, resync: bool) -> Result<()> {
    let mut o = offset;
    while o < offset + len {
        let n = (offset + len - o).min(RESYNC_READ_BYTES);
        let read = i.store.enqueue_read(i.volume, o, n).await?;
        seq.ship(Out::Read { tag, offset: o, read, resync }).await;
        o += n;
    }
    Ok(())
}

/// Queues a `CrcRequest` for `[offset, offset + len)` at this point of the order (the caller holds
/// the sequencer): the answer is the peer's image after every frame queued before it.
async fn ask_crcs(i: &Inner, seq: &mut Seq, offset: u64, len: u64) -> Result<oneshot::Receiver<Vec<Option<u32>>>> {
    if seq.link.is_none() {
        return Err(ReplError::Stopped("link lost".into()));
    }
    let id = i.next_crc_id.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = oneshot::channel();
    // Registered before the frame can reach the peer, so the answer always finds its waiter.
    i.crc_waiters.lock().expect("crc waiters").insert(id, CrcWaiter { offset, n_blocks: (len / BB) as usize, tx });
    seq.ship(Out::Frame(Frame::CrcRequest { id, offset, len })).await;
    if seq.link.is_none() {
        i.crc_waiters.lock().expect("crc waiters").remove(&id);
        return Err(ReplError::Stopped("link lost".into()));
    }
    Ok(rx)
}

/// What a block comparison calls for: the peer's copy matches (or both are holes); the primary's
/// block must be shipped; or the peer holds a block the primary does not have (a trim).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fix {
    Same,
    Ship,
    Trim,
}

fn fix(mine: Option<u32>, theirs: Option<u32>) -> Fix {
    match (mine, theirs) {
        (Some(a), Some(b)) if a == b => Fix::Same,
        (None, None) => Fix::Same,
        (Some(_), _) => Fix::Ship,
        (None, Some(_)) => Fix::Trim,
    }
}

/// Runs of equal [`Fix`] over a window starting at byte `at`: (offset, len, fix).
fn fix_runs(at: u64, mine: &[Option<u32>], theirs: &[Option<u32>]) -> Vec<(u64, u64, Fix)> {
    let mut out: Vec<(u64, u64, Fix)> = Vec::new();
    for (k, (m, t)) in mine.iter().zip(theirs).enumerate() {
        let f = fix(*m, *t);
        match out.last_mut() {
            Some(last) if last.2 == f => last.1 += BB,
            _ => out.push((at + k as u64 * BB, BB, f)),
        }
    }
    out
}

/// Queues the repairs `runs` call for (the caller holds the sequencer); returns bytes shipped as
/// reads and bytes trimmed.
async fn queue_fixes(i: &Inner, seq: &mut Seq, tag: u64, runs: &[(u64, u64, Fix)], resync: bool) -> Result<(u64, u64)> {
    let (mut shipped, mut trimmed) = (0, 0);
    for &(offset, len, f) in runs {
        match f {
            Fix::Same => {}
            Fix::Ship => {
                queue_reads(i, seq, tag, offset, len, resync).await?;
                shipped += len;
            }
            Fix::Trim => {
                seq.ship(Out::Frame(Frame::Trim { tag, offset, len })).await;
                trimmed += len;
            }
        }
    }
    Ok((shipped, trimmed))
}

/// Full sync of a peer that shares no history with this node but may hold much of the data (a
/// replica restored from a backup, or one whose history was lost): ships only the blocks whose
/// checksums differ.
///
/// For each window, the peer's checksums are asked at a point P1 of the order (a `CrcRequest`
/// queued under the sequencer; the peer answers with its image after every frame before it), and
/// when the answer is in, the primary takes its own checksums at a later point P2, again under
/// the sequencer, and there queues reads of the blocks where its copy at P2 differs from the
/// peer's at P1, and trims of the blocks only the peer has mapped.
///
/// Why a block b left alone (primary@P2 == peer@P1) is right on the peer at P2: the link existed
/// before P1, so every operation on b between P1 and P2 — client writes, trims, zeroings, and
/// resync writes of earlier windows, which carry the primary's data at their own point — reached
/// both nodes in the same order. If one of them replaced b whole, both hold the same bytes from
/// there on, and later operations keep them equal. If all of them were partial overlays w1..wk
/// (sub-block writes, merged with the old block on each node), then primary@P2 = primary@P1∘w1..wk
/// and peer@P2 = peer@P1∘w1..wk = primary@P2∘w1..wk, which is primary@P2 because re-applying
/// overlays that the block already ends with changes nothing. If nothing touched b, peer@P2 =
/// peer@P1 = primary@P2. A block that is shipped is read at P2, so the peer receives the
/// primary's content at P2 at its place in the order, whatever raced with the comparison.
/// (Equal CRC32s of different blocks, a 2⁻³² chance per differing block, go undetected, as for
/// verify.)
///
/// Requests run `CRC_LOOKAHEAD` windows ahead, so the peer answers window k+1 while window k's
/// data is on the wire; the argument only needs each window's P1 to precede its P2.
async fn sync_by_checksums(i: &Inner, windows: &[(u64, u64)]) -> Result<()> {
    let lost = || ReplError::Stopped("link lost during resync".into());
    let mut asked = VecDeque::new();
    let mut next = 0;
    {
        let mut seq = i.seq.lock().await;
        while next < windows.len() && asked.len() < CRC_LOOKAHEAD {
            let (at, len) = windows[next];
            asked.push_back(ask_crcs(i, &mut seq, at, len).await?);
            next += 1;
        }
    }
    for &(at, len) in windows {
        let rx = asked.pop_front().expect("one request per window");
        let theirs = rx.await.map_err(|_| lost())?;
        let mut seq = i.seq.lock().await;
        if seq.link.is_none() {
            return Err(lost());
        }
        if next < windows.len() {
            let (at, len) = windows[next];
            asked.push_back(ask_crcs(i, &mut seq, at, len).await?);
            next += 1;
        }
        let tag = seq.next_tag - 1;
        // P2: under the sequencer, after everything queued before it, before anything after.
        let mine = i.store.block_crcs(i.volume, at, len).await?;
        let runs = fix_runs(at, &mine, &theirs);
        let (_, trimmed) = queue_fixes(i, &mut seq, tag, &runs, true).await?;
        drop(seq);
        let skipped: u64 = runs.iter().filter(|r| r.2 == Fix::Same).map(|r| r.1).sum();
        i.peer.send_modify(|v| {
            v.resync.bytes_done += skipped + trimmed;
            v.resync_bytes_skipped += skipped;
        });
    }
    Ok(())
}

type CrcAnswers = (Pending<Vec<Option<u32>>>, oneshot::Receiver<Vec<Option<u32>>>);

fn verify_lost() -> ReplError {
    ReplError::Stopped(
        "the link to the peer was lost (or replaced) during verify; run it again once the peer is in sync".into(),
    )
}

/// Asks both nodes for a window's checksums at this point of the order (the caller holds the
/// sequencer), on the link the pass started on.
async fn ask_both(i: &Inner, seq: &mut Seq, link_gen: u64, at: u64, len: u64) -> Result<CrcAnswers> {
    if seq.link_gen != link_gen || seq.link.is_none() {
        return Err(verify_lost());
    }
    let mine = i.store.enqueue_block_crcs(i.volume, at, len).await?;
    let theirs = ask_crcs(i, seq, at, len).await.map_err(|_| verify_lost())?;
    Ok((mine, theirs))
}

/// The verify pass proper (see [`Primary::verify`]), `CRC_LOOKAHEAD` windows in flight.
async fn verify_windows(i: &Inner, link_gen: u64, repair: bool) -> Result<VerifyReport> {
    let started = Instant::now();
    let windows = windows(&[(0, i.size_bytes / BB)], CRC_WINDOW_BYTES);
    let mut report = VerifyReport::default();
    let mut asked: VecDeque<CrcAnswers> = VecDeque::new();
    let mut next = 0;
    {
        let mut seq = i.seq.lock().await;
        while next < windows.len() && asked.len() < CRC_LOOKAHEAD {
            let (at, len) = windows[next];
            asked.push_back(ask_both(i, &mut seq, link_gen, at, len).await?);
            next += 1;
        }
    }
    for &(at, len) in &windows {
        let (mine, theirs) = asked.pop_front().expect("one request per window");
        let mine = mine.wait().await?;
        let theirs = theirs.await.map_err(|_| verify_lost())?;
        let differing: Vec<bool> = mine.iter().zip(&theirs).map(|(m, t)| fix(*m, *t) != Fix::Same).collect();
        let any = differing.iter().any(|d| *d);
        let mut seq = i.seq.lock().await;
        if next < windows.len() {
            let (at, len) = windows[next];
            asked.push_back(ask_both(i, &mut seq, link_gen, at, len).await?);
            next += 1;
        }
        if repair && any {
            if seq.link_gen != link_gen || seq.link.is_none() {
                return Err(verify_lost());
            }
            // A later point R than the comparison's: ship the primary's state at R (data, or a
            // trim where it has none now), so that a write between the two points is not undone.
            // Blocks equal at the comparison stay equal: both nodes apply the same operations.
            let tag = seq.next_tag - 1;
            let now = i.store.block_crcs(i.volume, at, len).await?;
            let mut fixes: Vec<(u64, u64, Fix)> = Vec::new();
            for (k, (c, d)) in now.iter().zip(&differing).enumerate() {
                let f = match (d, c) {
                    (false, _) => Fix::Same,
                    (true, Some(_)) => Fix::Ship,
                    (true, None) => Fix::Trim,
                };
                match fixes.last_mut() {
                    Some(last) if last.2 == f => last.1 += BB,
                    _ => fixes.push((at + k as u64 * BB, BB, f)),
                }
            }
            let (shipped, trimmed) = queue_fixes(i, &mut seq, tag, &fixes, false).await?;
            report.blocks_repaired += (shipped + trimmed) / BB;
        }
        drop(seq);
        for (k, d) in differing.iter().enumerate() {
            if !*d {
                continue;
            }
            report.blocks_differing += 1;
            let offset = at + k as u64 * BB;
            let n_ranges = report.ranges.len();
            match report.ranges.last_mut() {
                Some((o, l)) if *o + *l == offset => *l += BB,
                _ if n_ranges < VERIFY_RANGES_MAX => report.ranges.push((offset, BB)),
                _ => report.ranges_truncated = true,
            }
        }
        report.bytes_compared += len;
        i.peer.send_modify(|v| v.verify.bytes_done += len);
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

async fn write_loop(i: Arc<Inner>, mut wr: crate::net::WritePart, mut rx: mpsc::Receiver<Out>) -> Result<()> {
    let mut tick = tokio::time::interval(i.cfg.heartbeat);
    loop {
        // Biased (reproducible in the simulation), heartbeat first: it is ready once a period, so it
        // never starves the frames, while a steady stream of frames would starve it the other way.
        let out = tokio::select! {
            biased;
            _ = tick.tick() => {
                let nonce = i.next_nonce.fetch_add(1, Ordering::Relaxed) + 1;
                let floor = floor_tag(&i);
                let epoch = i.state.lock().expect("state").epoch;
                write_frame(&mut wr, &Frame::Ping { epoch, nonce, floor }).await?;
                continue;
            }
            out = rx.recv() => match out {
                Some(out) => out,
                None => return Err(ReplError::Stopped("link closed".into())),
            },
        };
        match out {
            Out::Frame(f) => {
                // Everything the sequencer queued meanwhile goes out in the same write.
                let mut buf = BytesMut::new();
                f.encode_into(&mut buf);
                let mut next = None;
                while buf.len() < COALESCE_BYTES {
                    match rx.try_recv() {
                        Ok(Out::Frame(f)) => f.encode_into(&mut buf),
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                write_encoded(&mut wr, &buf).await?;
                if let Some(Out::Read { tag, offset, read, resync }) = next {
                    ship_read(&i, &mut wr, tag, offset, read, resync).await?;
                }
            }
            Out::Read { tag, offset, read, resync } => ship_read(&i, &mut wr, tag, offset, read, resync).await?,
        }
    }
}

/// Coalescing bound of the link writer: frames queued together are written together up to this
/// many bytes (a syscall per 256 KiB is cheap; beyond that, latency of the first frame matters).
const COALESCE_BYTES: usize = 256 << 10;

/// Ships the result of a queued read as a write frame (resync and repair).
async fn ship_read(
    i: &Inner,
    wr: &mut crate::net::WritePart,
    tag: u64,
    offset: u64,
    read: Pending<Bytes>,
    resync: bool,
) -> Result<()> {
    let data = read.wait().await?;
    let n = data.len() as u64;
    write_frame(wr, &Frame::Write { tag, offset, fua: false, data }).await?;
    if resync {
        i.peer.send_modify(|v| {
            v.resync.bytes_done += n;
            v.resync_bytes_shipped += n;
        });
    }
    Ok(())
}

async fn read_loop(i: Arc<Inner>, mut rd: crate::net::ReadPart) -> Result<()> {
    loop {
        match read_frame(&mut rd, i.cfg.timeout).await? {
            Frame::Ack { applied, durable } => {
                i.lag.lock().expect("lag").durable_through(durable);
                i.peer.send_modify(|v| {
                    v.applied = v.applied.max(applied);
                    v.durable = v.durable.max(durable);
                });
            }
            Frame::Pong { nonce } => i.peer.send_modify(|v| v.pong = v.pong.max(nonce)),
            Frame::CrcReply { id, offset, crcs } => {
                let waiter = i.crc_waiters.lock().expect("crc waiters").remove(&id);
                match waiter {
                    Some(w) if w.offset == offset && w.n_blocks == crcs.len() => {
                        let _ = w.tx.send(crcs);
                    }
                    Some(w) => {
                        return Err(ReplError::refused(
                            Refusal::Protocol,
                            format!(
                                "checksum reply {id} covers {} blocks at {offset}, asked {} at {}",
                                crcs.len(),
                                w.n_blocks,
                                w.offset
                            ),
                        ))
                    }
                    // Its asker gave up (a verify pass that failed): nothing waits for it.
                    None => {}
                }
            }
            Frame::Refuse { why, reason } => return Err(ReplError::refused(why, format!("peer: {reason}"))),
            other => {
                return Err(ReplError::refused(
                    Refusal::Protocol,
                    format!("unexpected frame from the secondary: {other:?}"),
                ))
            }
        }
    }
}

/// The tag known durable on both nodes: trims above it are still needed by a future resync.
fn floor_tag(i: &Inner) -> u64 {
    let local = *i.local_durable.lock().expect("durable");
    local.min(i.peer.borrow().durable)
}

/// Raises the store's trim floor as both nodes confirm durability, at most every `FLOOR_PERIOD`.
async fn run_floor(i: Arc<Inner>, mut floor: u64) {
    let mut stop = i.stop.subscribe();
    loop {
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(FLOOR_PERIOD) => {}
        }
        let f = floor_tag(&i);
        if f > floor {
            let attr = i.state.lock().expect("state").encode();
            if let Err(e) = i.store.set_repl(i.volume, KEEP_LAST_TAG, f, attr).await {
                tracing::warn!(volume = %i.name, "could not record the trim floor: {e}");
                return;
            }
            floor = f;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_rate_and_eta() {
        let t0 = Instant::now();
        let mut p = Progress { bytes_total: 1000, bytes_done: 250, started: Some(t0), ended: None };
        let now = t0 + Duration::from_secs(5);
        assert_eq!(p.rate_bytes_per_sec_at(now), 50);
        assert_eq!(p.eta_at(now), Some(Duration::from_secs(15)));
        p.bytes_done = 0;
        assert_eq!(p.eta_at(now), None, "no rate yet");
        p.bytes_done = 1000;
        p.ended = Some(t0 + Duration::from_secs(10));
        assert!(!p.active());
        assert_eq!(p.elapsed_at(now + Duration::from_secs(100)), Duration::from_secs(10));
        assert_eq!(p.rate_bytes_per_sec_at(now), 100);
        assert_eq!(p.eta_at(now), None, "finished");
        assert_eq!(Progress::default().rate_bytes_per_sec_at(now), 0);
    }

    #[test]
    fn lag_counts_the_bytes_of_writes_after_the_applied_tag() {
        let mut lag = Lag::default();
        for tag in 1..=10 {
            lag.wrote(tag, 100);
        }
        assert_eq!(lag.bytes_after(0), 1000);
        assert_eq!(lag.bytes_after(4), 600);
        lag.durable_through(3);
        assert_eq!(lag.bytes_after(3), 700);
        // A reconnection may report an applied tag back at the durable point: still exact.
        assert_eq!(lag.bytes_after(5), 500);
        assert_eq!(lag.bytes_after(10), 0);
        // Far behind: coarser samples, bounded memory, never an under-estimate.
        let mut lag = Lag::default();
        for tag in 1..=(4 * LAG_SAMPLES_MAX as u64) {
            lag.wrote(tag, 1);
        }
        assert!(lag.samples.len() <= LAG_SAMPLES_MAX);
        let total = 4 * LAG_SAMPLES_MAX as u64;
        for applied in [0, 1, 1000, total / 2, total - 1, total] {
            let got = lag.bytes_after(applied);
            assert!(got >= total - applied && got <= total - applied + 2 * lag.stride, "applied {applied}: {got}");
        }
        assert!(lag.stride <= 16, "{}", lag.stride);
        lag.durable_through(total);
        assert_eq!((lag.bytes_after(total), lag.stride), (0, 1));
    }

    #[test]
    fn fix_runs_group_blocks_by_what_they_need() {
        let mine = [Some(1), Some(2), None, None, Some(5), Some(6)];
        let theirs = [Some(1), Some(9), Some(3), None, None, Some(6)];
        assert_eq!(
            fix_runs(BB, &mine, &theirs),
            [
                (BB, BB, Fix::Same),
                (2 * BB, BB, Fix::Ship),
                (3 * BB, BB, Fix::Trim),
                (4 * BB, BB, Fix::Same),
                (5 * BB, BB, Fix::Ship),
                (6 * BB, BB, Fix::Same)
            ]
        );
        assert_eq!(windows(&[(0, 3), (10, 1)], 2 * BB), [(0, 2 * BB), (2 * BB, BB), (10 * BB, BB)]);
    }
}
