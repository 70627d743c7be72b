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

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use syncblock_engine::{Pending, Since, Store, Tag, VolumeId, BLOCK_BYTES, KEEP_LAST_TAG};
use tokio::sync::{mpsc, watch};

use crate::link::{read_frame, write_frame};
use crate::state::{ReplState, Role};
use crate::wire::Frame;
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
    pub last_error: Option<String>,
    pub resync_bytes_total: u64,
    pub resync_bytes_done: u64,
    pub resyncs: u64,
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
    pub last_tag: u64,
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
    /// Resync data: the engine read was queued in sequencer order; its bytes follow when ready.
    Read {
        tag: u64,
        offset: u64,
        read: Pending<Bytes>,
    },
}

struct Seq {
    next_tag: u64,
    link: Option<mpsc::Sender<Out>>,
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
    stop: watch::Sender<bool>,
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
        granted: Option<u64>,
    ) -> Result<Primary> {
        let info = store.volume(volume_name).await?;
        let mut state = ReplState::decode(&info.attr).unwrap_or_else(|| ReplState::new(Role::Primary));
        // Every start is a new epoch: after a crash this node may have lost tags its peer holds, and
        // must never assign the same (epoch, tag) to a different write.
        {
            if !state.consistent {
                return Err(ReplError::Refused(format!(
                    "volume {volume_name} holds a half-applied resync; it cannot become primary: \
                     resync it from its peer first"
                )));
            }
            let epoch = granted.unwrap_or(state.epoch + 1);
            if epoch <= state.epoch {
                return Err(ReplError::Refused(format!(
                    "granted epoch {epoch} is not newer than this node's epoch {}",
                    state.epoch
                )));
            }
            state.begin_epoch(epoch, info.last_tag + 1);
            tracing::info!(volume = volume_name, epoch, "taking the primary role");
        }
        // Retain trims until the peer confirms it has them (the floor rises as it does).
        let floor = info.trim_floor.min(info.last_tag);
        store.set_repl(info.id, KEEP_LAST_TAG, floor, state.encode()).await?;
        let (peer, _) = watch::channel(PeerView::default());
        let (stop, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            store,
            volume: info.id,
            name: volume_name.to_string(),
            size_bytes: info.size_bytes,
            peer_addr,
            cfg,
            seq: tokio::sync::Mutex::new(Seq { next_tag: info.last_tag + 1, link: None }),
            peer,
            state: Mutex::new(state),
            local_durable: Mutex::new(0),
            stop,
        });
        tokio::spawn(run_links(inner.clone()));
        tokio::spawn(run_floor(inner.clone(), floor));
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

    /// Whether both handles are the same primary (not merely of the same volume).
    pub fn same(&self, other: &Primary) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    pub fn epoch(&self) -> u64 {
        self.inner.state.lock().expect("state").epoch
    }

    pub async fn status(&self) -> PrimaryStatus {
        let last_tag = self.inner.seq.lock().await.next_tag - 1;
        PrimaryStatus {
            volume: self.inner.name.clone(),
            epoch: self.inner.state.lock().expect("state").epoch,
            last_tag,
            peer: self.inner.peer.borrow().clone(),
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
            seq.ship(Out::Frame(Frame::Write { tag, offset, fua, data })).await;
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
            seq.ship(Out::Frame(Frame::Flush { upto })).await;
            (p, upto)
        };
        pending.wait().await?;
        {
            let mut d = i.local_durable.lock().expect("durable");
            *d = (*d).max(upto);
        }
        self.wait_peer(upto, true).await
    }

    /// Waits until the peer has `tag` in its log (and durable, with `durable`). Under the strict
    /// policy this waits through disconnections: the write completes once the peer is back and
    /// resynced, and never before.
    async fn wait_peer(&self, tag: u64, durable: bool) -> Result<()> {
        let mut peer = self.inner.peer.subscribe();
        let mut stop = self.inner.stop.subscribe();
        tokio::select! {
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
            r = one_link(&i) => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        if let Err(e) = r {
            let msg = e.to_string();
            if msg.contains("stale epoch") {
                tracing::error!(volume = %i.name, "deposed: {msg}");
                i.peer.send_modify(|v| v.deposed = Some(msg.clone()));
            }
            if msg != last_error {
                tracing::warn!(volume = %i.name, peer = %i.peer_addr, "replication link: {msg}");
                last_error = msg.clone();
            }
            i.peer.send_modify(|v| v.last_error = Some(msg));
        }
        i.seq.lock().await.link = None;
        i.peer.send_modify(|v| {
            v.connected = false;
            v.in_sync = false;
        });
        if i.peer.borrow().deposed.is_some() {
            return;
        }
        tokio::time::sleep(i.cfg.reconnect).await;
    }
}

/// Reports to the witness every heartbeat; learns there if it was deposed; under the `degrade`
/// policy asks to continue alone once the peer has been away for the timeout.
async fn run_witness_reports(i: Arc<Inner>, witness: SocketAddr) {
    let mut stop = i.stop.subscribe();
    let mut away_since: Option<Instant> = None;
    let mut last_error = String::new();
    let mut first = true;
    loop {
        if !first {
            tokio::select! {
                _ = tokio::time::sleep(i.cfg.heartbeat) => {}
                _ = stop.wait_for(|s| *s) => return,
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
        let epoch = i.state.lock().expect("state").epoch;
        let report = Frame::WitnessReport { volume: i.name.clone(), node: i.cfg.node.clone(), epoch, in_sync };
        match crate::witness::ask(i.cfg.net.as_ref(), witness, &report, i.cfg.timeout).await {
            Ok(_) => last_error.clear(),
            Err(ReplError::Refused(why)) => {
                tracing::error!(volume = %i.name, "the witness says this primary was deposed: {why}");
                i.peer.send_modify(|v| v.deposed = Some(why));
                return;
            }
            Err(e) => {
                let msg = e.to_string();
                if msg != last_error {
                    tracing::warn!(volume = %i.name, "witness unreachable: {msg}");
                    last_error = msg;
                }
            }
        }
        away_since = if connected { None } else { away_since.or(Some(Instant::now())) };
        let away_long = away_since.is_some_and(|t| t.elapsed() >= i.cfg.timeout);
        if i.cfg.policy == crate::Policy::Degrade && away_long && !i.peer.borrow().solo {
            let req = Frame::WitnessSolo { volume: i.name.clone(), node: i.cfg.node.clone(), epoch };
            match crate::witness::ask(i.cfg.net.as_ref(), witness, &req, i.cfg.timeout).await {
                Ok(_) => {
                    tracing::warn!(volume = %i.name, "peer away: continuing alone with the witness's consent (RPO > 0 until it resyncs)");
                    i.peer.send_modify(|v| v.solo = true);
                }
                Err(ReplError::Refused(why)) => {
                    tracing::error!(volume = %i.name, "the witness refuses solo operation: {why}");
                    if why.starts_with("stale") {
                        i.peer.send_modify(|v| v.deposed = Some(why));
                        return;
                    }
                }
                Err(e) => tracing::warn!(volume = %i.name, "witness unreachable for solo: {e}"),
            }
        }
    }
}

async fn one_link(i: &Arc<Inner>) -> Result<()> {
    let stream = tokio::time::timeout(i.cfg.timeout, i.cfg.net.connect(i.peer_addr))
        .await
        .map_err(|_| ReplError::Stopped("connect timed out".into()))??;
    let (mut rd, mut wr) = crate::net::split(stream);
    let (epoch, history) = {
        let s = i.state.lock().expect("state");
        (s.epoch, s.history.clone())
    };
    let last_tag = i.seq.lock().await.next_tag - 1;
    let hello = Frame::Hello {
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
        Frame::Refuse { reason } => return Err(ReplError::Refused(format!("peer refused: {reason}"))),
        other => return Err(ReplError::Refused(format!("unexpected {other:?} in handshake"))),
    };
    tracing::info!(volume = %i.name, peer = %i.peer_addr, peer_last, common, "peer connected; resyncing");
    i.peer.send_modify(|v| {
        v.connected = true;
        v.in_sync = false;
        v.applied = peer_last.min(common);
        v.durable = v.durable.min(v.applied);
        v.last_error = None;
        v.resyncs += 1;
        v.resync_bytes_done = 0;
        v.resync_bytes_total = 0;
    });

    // From here on every client write is streamed as well.
    let (tx, rx) = mpsc::channel(LINK_QUEUE);
    {
        let mut seq = i.seq.lock().await;
        seq.link = Some(tx.clone());
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
            r = &mut resync, if !resync_done => {
                resync_done = true;
                r?;
            }
            r = &mut writer.0 => return r.map_err(|e| ReplError::Stopped(e.to_string()))?,
            r = &mut reader.0 => return r.map_err(|e| ReplError::Stopped(e.to_string()))?,
        }
    }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Ships what the peer lacks: every block changed after `common` (or the whole volume when they
/// share nothing) plus the peer's own divergent `runs`, then commits.
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
    let bb = BLOCK_BYTES as u64;
    let mut ranges: Vec<(u64, u64)> = if common == 0 {
        vec![(0, i.size_bytes / bb)]
    } else {
        let mut r: Vec<(u64, u64)> =
            i.store.changed_since(i.volume, Since::Tag(common)).await?.iter().map(|c| (c.lba.0, c.n_blocks)).collect();
        r.extend(runs);
        r
    };
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (lba, n) in ranges {
        let end = (lba + n).min(i.size_bytes / bb);
        match merged.last_mut() {
            Some((l, m)) if *l + *m >= lba => *m = (*m).max(end.saturating_sub(*l)),
            _ if end > lba => merged.push((lba, end - lba)),
            _ => {}
        }
    }
    let total: u64 = merged.iter().map(|(_, n)| n * bb).sum();
    i.peer.send_modify(|v| v.resync_bytes_total = total);
    for (lba, n) in merged {
        let mut at = lba * bb;
        let end = (lba + n) * bb;
        while at < end {
            let window = (end - at).min(RESYNC_WINDOW_BYTES);
            let mut seq = i.seq.lock().await;
            if seq.link.is_none() {
                return Err(ReplError::Stopped("link lost during resync".into()));
            }
            let tag = seq.next_tag - 1;
            // Asked under the sequencer lock: the answer is the state at this point of the order.
            let extents = i.store.block_status(i.volume, at, window).await?;
            for e in extents {
                if !e.mapped {
                    seq.ship(Out::Frame(Frame::Trim { tag, offset: e.offset, len: e.len })).await;
                    continue;
                }
                let mut o = e.offset;
                while o < e.offset + e.len {
                    let len = (e.offset + e.len - o).min(RESYNC_READ_BYTES);
                    let read = i.store.enqueue_read(i.volume, o, len).await?;
                    seq.ship(Out::Read { tag, offset: o, read }).await;
                    o += len;
                }
            }
            drop(seq);
            at += window;
        }
    }
    let commit = {
        let mut seq = i.seq.lock().await;
        let tag = seq.next_tag - 1;
        seq.ship(Out::Frame(Frame::ResyncCommit { tag, epoch, history })).await;
        if seq.link.is_none() {
            return Err(ReplError::Stopped("link lost during resync".into()));
        }
        tag
    };
    let mut peer = i.peer.subscribe();
    peer.wait_for(|v| !v.connected || v.applied >= commit).await.map_err(|_| ReplError::Stopped("shut down".into()))?;
    if !peer.borrow().connected {
        return Err(ReplError::Stopped("link lost before the resync committed".into()));
    }
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(volume = %i.name, bytes = total, secs, "resync committed at tag {commit}; peer in sync");
    i.peer.send_modify(|v| {
        v.in_sync = true;
        // The peer has everything: every write is confirmed by it again (the witness hears that
        // the pair is in sync at the next report, which clears its solo mark).
        v.solo = false;
        v.resync_bytes_done = total;
    });
    Ok(())
}

async fn write_loop(i: Arc<Inner>, mut wr: crate::net::WritePart, mut rx: mpsc::Receiver<Out>) -> Result<()> {
    let mut tick = tokio::time::interval(i.cfg.heartbeat);
    let mut nonce = 0u64;
    loop {
        let out = tokio::select! {
            out = rx.recv() => match out {
                Some(out) => out,
                None => return Err(ReplError::Stopped("link closed".into())),
            },
            _ = tick.tick() => {
                nonce += 1;
                let floor = floor_tag(&i);
                let epoch = i.state.lock().expect("state").epoch;
                write_frame(&mut wr, &Frame::Ping { epoch, nonce, floor }).await?;
                continue;
            }
        };
        match out {
            Out::Frame(f) => write_frame(&mut wr, &f).await?,
            Out::Read { tag, offset, read } => {
                let data = read.wait().await?;
                let n = data.len() as u64;
                write_frame(&mut wr, &Frame::Write { tag, offset, fua: false, data }).await?;
                i.peer.send_modify(|v| v.resync_bytes_done += n);
            }
        }
    }
}

async fn read_loop(i: Arc<Inner>, mut rd: crate::net::ReadPart) -> Result<()> {
    loop {
        match read_frame(&mut rd, i.cfg.timeout).await? {
            Frame::Ack { applied, durable } => i.peer.send_modify(|v| {
                v.applied = v.applied.max(applied);
                v.durable = v.durable.max(durable);
            }),
            Frame::Pong { .. } => {}
            Frame::Refuse { reason } => return Err(ReplError::Refused(format!("peer: {reason}"))),
            other => return Err(ReplError::Refused(format!("unexpected frame from the secondary: {other:?}"))),
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
            _ = tokio::time::sleep(FLOOR_PERIOD) => {}
            _ = stop.wait_for(|s| *s) => return,
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
