//! The secondary side: accepts its primary's connection and applies the stream to the local store
//! in the primary's order, acknowledging cumulatively.
//!
//! One task reads frames and queues each into the engine in arrival order (the engine's log order is
//! its queue order, so the local log is the primary's order); the same task, in the same loop,
//! retires the engine results in that order and sends `Ack { applied, durable }`. A resync is applied like any
//! stream, but its writes are marked so they do not move the volume's last tag; the commit moves it
//! in one durable record. Until then the replica is marked inconsistent and refuses promotion.
//!
//! A `CrcRequest` is queued into the engine like any frame, so its answer (the block checksums
//! from the index) is the image after every earlier frame: the point in the stream where the
//! primary took its own checksums, for full sync and verify.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use syncblock_engine::{BlockRun, Epoch, Pending, Since, StagedOp, Store, Tag, VolumeId, Written, BLOCK_BYTES};

use tokio::sync::watch;

use crate::link::write_frame;
use crate::net::{BoxListener, Incoming};
use crate::state::{common_point, record_state, FloorRecord, ReplState, Role};
use crate::wire::{Frame, Refusal, HELLO_RUNS_MAX};
use crate::{ReplConfig, ReplError, Result};

/// Engine operations queued but not yet acknowledged to the primary, and the write data they hold
/// (`APPLY_QUEUE_BYTES`): past either, the reader stops reading the socket and TCP pushes back.
/// The count bounds the items a stream of small frames queues: 4096 keeps 16 MiB of 4 KiB writes
/// in flight, four of the engine's 1 MiB batches and as many queued behind them. (At 256, a copy
/// shipping a scattered volume as 4 KiB writes had 1 MiB in the engine at a time, one batch, and
/// ran at half the disk's rate.)
const APPLY_QUEUE: usize = 4096;
/// The write data queued operations may hold: bounds the memory a fast primary can pin on a slow
/// secondary, whatever the size of its frames (a frame is queued while the total is below this,
/// so it is exceeded by at most one ≤ 32 MiB write). 64 MiB is what the primary's resync keeps
/// unconfirmed, plus room for client writes streamed meanwhile.
const APPLY_QUEUE_BYTES: u64 = 96 << 20;

/// A snapshot for `syncblock status`.
#[derive(Debug, Clone, Default)]
pub struct SecondaryStatus {
    pub volume: String,
    pub epoch: Epoch,
    pub connected: bool,
    pub primary: Option<String>,
    pub consistent: bool,
    pub resyncing: bool,
    pub applied: u64,
    pub durable: u64,
    pub last_error: Option<String>,
    /// Writes, trims and zeroings applied, and the microseconds they took in sum, from their frame
    /// being decoded to their engine completion being retired (the secondary's part of a
    /// replicated write's latency).
    pub apply_ops: u64,
    pub apply_us: u64,
}

struct Inner {
    store: Store,
    volume: VolumeId,
    name: String,
    size_bytes: u64,
    cfg: ReplConfig,
    state: Mutex<ReplState>,
    status: watch::Sender<SecondaryStatus>,
    stop: watch::Sender<bool>,
}

/// The secondary of one replicated volume.
#[derive(Clone)]
pub struct Secondary {
    inner: Arc<Inner>,
    addr: SocketAddr,
}

impl std::fmt::Debug for Secondary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secondary").field("volume", &self.inner.name).finish_non_exhaustive()
    }
}

enum Applied {
    /// A write, trim or zeroing with this tag; FUA ones are durable (with everything before them:
    /// the engine's log is durable as a prefix) when they complete, and so are others the engine
    /// reports durable, outside a resync (whose writes count only once committed).
    Op {
        tag: u64,
        /// Write data it holds.
        bytes: u64,
        fua: bool,
        streamed: bool,
        /// When its frame was decoded.
        received: Instant,
        done: Pending<Written>,
    },
    /// A flush covering every tag up to this.
    Flush(u64, Pending<()>),
    /// The resync is complete up to this tag.
    Commit(u64, Pending<()>),
    Pong(u64),
    Floor(u64),
    /// Block checksums asked by `CrcRequest { id, offset, .. }`.
    Crcs(u64, u64, Pending<Vec<Option<u32>>>),
}

impl Secondary {
    /// Starts serving replication for `volume_name` on `listener`.
    pub async fn start(store: Store, volume_name: &str, listener: BoxListener, cfg: ReplConfig) -> Result<Secondary> {
        let info = store.volume(volume_name).await?;
        let mut state = ReplState::decode(&info.attr).unwrap_or_else(|| ReplState::new(Role::Secondary));
        if state.role != Role::Secondary {
            tracing::info!(volume = volume_name, epoch = state.epoch.0, "taking the secondary role");
            state.role = Role::Secondary;
        }
        record_state(&store, &info, &state, StagedOp::Keep).await?;
        let addr = listener.local_addr()?;
        let (status, _) = watch::channel(SecondaryStatus {
            volume: volume_name.to_string(),
            epoch: state.epoch,
            consistent: state.consistent,
            applied: info.last_tag,
            durable: info.last_tag,
            ..SecondaryStatus::default()
        });
        let inner = Arc::new(Inner {
            store,
            volume: info.id,
            name: volume_name.to_string(),
            size_bytes: info.size_bytes,
            cfg,
            state: Mutex::new(state),
            status,
            stop: watch::channel(false).0,
        });
        tokio::spawn(accept_loop(inner.clone(), listener));
        Ok(Secondary { inner, addr })
    }

    /// Whether both handles are the same secondary.
    pub fn same(&self, other: &Secondary) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Stops accepting and ends the current session (its queued engine work still completes).
    pub async fn stop(&self) {
        let _ = self.inner.stop.send(true);
        let mut st = self.inner.status.subscribe();
        let _ = st.wait_for(|s| !s.connected).await;
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn status(&self) -> SecondaryStatus {
        self.inner.status.borrow().clone()
    }

    pub fn watch(&self) -> watch::Receiver<SecondaryStatus> {
        self.inner.status.subscribe()
    }
}

/// Connections whose hello is being read at once. A primary needs one; the rest are probes,
/// scanners or a stale primary retrying, and a small bound keeps them from piling up.
const HANDSHAKES_MAX: usize = 8;

/// A connection whose hello names this pair's volume, size and id and an epoch this node accepts:
/// only such a connection may replace the live session.
struct Authenticated {
    rd: crate::net::ReadPart,
    wr: crate::net::WritePart,
    hello: Frame,
    from: SocketAddr,
}

/// Whether a hello may take over this secondary: the refusal to answer it with otherwise.
fn check_hello(i: &Inner, hello: &Frame) -> std::result::Result<(), (Refusal, String)> {
    let Frame::Hello { pair, epoch, size_bytes, volume, node, .. } = hello else {
        return Err((Refusal::Protocol, format!("expected a hello, got {hello:?}")));
    };
    let (my_pair, my_epoch) = {
        let s = i.state.lock().expect("state");
        (s.pair, s.epoch)
    };
    if *volume != i.name {
        Err((Refusal::WrongVolume, format!("this node replicates volume {:?}, not {volume:?}", i.name)))
    } else if *size_bytes != i.size_bytes {
        let msg = format!(
            "volume {volume} is {size_bytes} bytes on the primary but {} bytes here: resize one side",
            i.size_bytes
        );
        Err((Refusal::SizeMismatch, msg))
    } else if *pair == 0 || (my_pair != 0 && *pair != my_pair) {
        let msg = format!(
            "{node} belongs to pair {pair:016x}, this replica to pair {my_pair:016x}; likely cause: a \
             --peer pointing at the wrong node, or a store reused from another pair (recreate the volume \
             to join a new pair)"
        );
        Err((Refusal::WrongPair, msg))
    } else if *epoch < my_epoch {
        let msg = format!(
            "stale epoch {epoch}: this node has seen epoch {my_epoch}; {node} was deposed and must rejoin as secondary"
        );
        Err((Refusal::Deposed { epoch: my_epoch }, msg))
    } else {
        Ok(())
    }
}

/// Reads a connection's hello and checks it, apart from the live session, which it never
/// touches: garbage, a wrong peer or a probe is refused (or dropped) and logged here.
async fn handshake(i: Arc<Inner>, incoming: Incoming) -> Option<Authenticated> {
    let from = incoming.from;
    let peer = match incoming.establish().await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(volume = %i.name, %from, "replication port: TLS handshake failed: {e}; connection dropped");
            return None;
        }
    };
    let (mut rd, mut wr) = crate::net::split(peer.stream);
    let hello = match rd.read_frame(i.cfg.timeout).await {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(volume = %i.name, %from, "replication port: not a syncblock primary ({e}); connection dropped, the live session carries on");
            return None;
        }
    };
    if let Frame::Hello { node, .. } = &hello {
        if let Err(reason) = peer.who.check_peer(node, i.cfg.peer_node.as_deref()) {
            tracing::warn!(volume = %i.name, %from, "refusing a primary: {reason}");
            let _ = write_frame(&mut wr, &Frame::Refuse { why: Refusal::Protocol, reason }).await;
            return None;
        }
    }
    if let Err((why, reason)) = check_hello(&i, &hello) {
        tracing::warn!(volume = %i.name, %from, "refusing a primary: {reason}");
        let _ = write_frame(&mut wr, &Frame::Refuse { why, reason }).await;
        return None;
    }
    Some(Authenticated { rd, wr, hello, from })
}

async fn accept_loop(i: Arc<Inner>, mut listener: BoxListener) {
    // One session at a time: a new authenticated connection (say, after the primary restarted)
    // replaces the current one, which may be a dead link not yet timed out.
    let mut current: Option<(tokio::task::JoinHandle<()>, watch::Sender<bool>)> = None;
    let mut stopped = i.stop.subscribe();
    let handshakes = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_MAX));
    let (auth_tx, mut auth_rx) = tokio::sync::mpsc::channel::<Authenticated>(HANDSHAKES_MAX);
    loop {
        let next = tokio::select! {
            biased;
            _ = stopped.wait_for(|s| *s) => None,
            a = auth_rx.recv() => Some(Ok(a.expect("the loop holds a sender"))),
            a = listener.accept() => Some(Err(a)),
        };
        let auth = match next {
            None => {
                if let Some((task, stop)) = current.take() {
                    let _ = stop.send(true);
                    let _ = task.await;
                }
                return;
            }
            Some(Err(Err(e))) => {
                tracing::warn!("replication accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Some(Err(Ok(incoming))) => {
                let from = incoming.from;
                let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                    tracing::warn!(volume = %i.name, %from, "replication port: {HANDSHAKES_MAX} handshakes in progress; dropping one more");
                    continue;
                };
                let (i2, tx) = (i.clone(), auth_tx.clone());
                tokio::spawn(async move {
                    if let Some(a) = handshake(i2, incoming).await {
                        let _ = tx.send(a).await;
                    }
                    drop(permit);
                });
                continue;
            }
            Some(Ok(auth)) => auth,
        };
        if let Some((task, stop)) = current.take() {
            let _ = stop.send(true);
            let _ = task.await;
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let i2 = i.clone();
        let task = tokio::spawn(async move {
            let from = auth.from;
            let r = session(&i2, auth, stop_rx).await;
            let msg = match r {
                Ok(()) => None,
                // The primary went away between frames, or this node is stopping or took a newer
                // connection: the ordinary ends of a session.
                Err(ReplError::Stopped(why)) => {
                    tracing::info!(volume = %i2.name, %from, "replication session ended: {why}");
                    Some(why)
                }
                Err(e) => {
                    tracing::warn!(volume = %i2.name, %from, "replication session ended: {e}");
                    Some(e.to_string())
                }
            };
            i2.status.send_modify(|s| {
                s.connected = false;
                s.last_error = msg;
            });
        });
        current = Some((task, stop_tx));
    }
}

async fn persist(i: &Inner, last_tag: u64, floor: u64) -> Result<()> {
    let attr = i.state.lock().expect("state").encode();
    i.store.set_repl(i.volume, last_tag, floor, attr).await?;
    Ok(())
}

async fn session(i: &Arc<Inner>, auth: Authenticated, mut stop: watch::Receiver<bool>) -> Result<()> {
    let Authenticated { mut rd, mut wr, hello, from } = auth;
    // Checked again: the session this one replaced may have accepted a newer epoch meanwhile.
    if let Err((why, reason)) = check_hello(i, &hello) {
        tracing::warn!(volume = %i.name, %from, "refusing a primary: {reason}");
        let _ = write_frame(&mut wr, &Frame::Refuse { why, reason: reason.clone() }).await;
        return Err(ReplError::refused(why, reason));
    }
    let Frame::Hello { pair, epoch, last_tag: primary_last, node, history, .. } = hello else {
        unreachable!("check_hello accepts only a hello");
    };
    let info = i.store.volume_info(i.volume).await?;
    // Accepting a primary of a newer epoch (and, at the first sync, the pair's id) is recorded
    // before anything of it is applied.
    let (my_history, consistent) = {
        let mut s = i.state.lock().expect("state");
        s.epoch = epoch;
        s.pair = pair;
        (s.history.clone(), s.consistent)
    };
    persist(i, info.last_tag, info.trim_floor).await?;
    let mut common = common_point(&history, primary_last, &my_history, info.last_tag);
    let mut runs = Vec::new();
    if common > 0 && (info.last_tag > common || !consistent) {
        // Writes this replica holds beyond the shared history (a deposed primary's tail, or a
        // half-applied resync): the primary overwrites them with its own data.
        runs = i
            .store
            .changed_since(i.volume, Since::Tag(common))
            .await?
            .iter()
            .map(|r| BlockRun { lba: r.lba, n_blocks: r.n_blocks })
            .collect();
        if runs.len() > HELLO_RUNS_MAX {
            common = 0;
            runs.clear();
        }
    }
    tracing::info!(volume = %i.name, %from, primary = %node, epoch = epoch.0, common, my_last = info.last_tag, divergent_runs = runs.len(), "primary connected");
    write_frame(&mut wr, &Frame::HelloOk { last_tag: info.last_tag, common_tag: common, runs }).await?;
    i.status.send_modify(|s| {
        s.connected = true;
        s.primary = Some(node.clone());
        s.epoch = epoch;
        s.last_error = None;
    });

    let mut session = Session::new(i.clone(), epoch, common, info.trim_floor);
    let mut out = Vec::new();
    loop {
        // Queue every whole frame already read into the engine, in arrival order.
        while session.has_room() {
            let Some(frame) = rd.try_frame()? else { break };
            session.on_frame(frame).await?;
        }
        // Wait for the oldest queued operations to complete, or for more bytes from the primary
        // (unless the queue is full: then TCP pushes back), whichever comes first. One task does
        // both, so a frame costs no hand-off between tasks: the engine's reply wakes this task,
        // which acknowledges at once.
        let done = tokio::select! {
            biased;
            done = std::future::poll_fn(|cx| poll_done(&mut session.queue, &mut session.queued_bytes, cx)), if !session.queue.is_empty() => done,
            r = rd.fill(i.cfg.silence_limit()), if session.has_room() => {
                r?;
                continue;
            }
            _ = stop.wait_for(|s| *s) => return Err(ReplError::Stopped("session closed (node stopping, or a newer connection replaced it)".into())),
        };
        session.on_done(done, &mut out).await?;
        // Everything owed goes out in one write (an ack and a pong together, say).
        if !out.is_empty() {
            let mut buf = bytes::BytesMut::new();
            for f in out.drain(..) {
                f.encode_into(&mut buf);
            }
            crate::link::write_encoded(&mut wr, &buf).await?;
        }
    }
}

/// One session with a primary, as a state machine: frames in ([`Session::on_frame`], which queues
/// each into the engine in arrival order), engine completions in ([`Session::on_done`], in the
/// same order), and the frames owed to the primary out. The driver in [`session`] only reads and
/// writes bytes.
struct Session {
    i: Arc<Inner>,
    /// The primary's epoch, fixed for the session.
    epoch: Epoch,
    /// The common point agreed in the handshake.
    common: u64,
    resyncing: bool,
    /// Queued in the engine, not yet retired: completions are retired in this order.
    queue: VecDeque<Applied>,
    /// Write data held by `queue` (see `APPLY_QUEUE_BYTES`).
    queued_bytes: u64,
    acks: Acks,
}

impl Session {
    fn new(i: Arc<Inner>, epoch: Epoch, common: u64, floor: u64) -> Session {
        let queue = VecDeque::new();
        Session { i, epoch, common, resyncing: false, queue, queued_bytes: 0, acks: Acks::new(floor) }
    }

    /// Appends `item` to the queue, counting the write data it holds.
    fn push(&mut self, item: Applied) {
        if let Applied::Op { bytes, .. } = &item {
            self.queued_bytes += bytes;
        }
        self.queue.push_back(item);
    }

    /// Whether another frame may be queued (see `APPLY_QUEUE`).
    fn has_room(&self) -> bool {
        self.queue.len() < APPLY_QUEUE && self.queued_bytes < APPLY_QUEUE_BYTES
    }

    /// Queues `frame` into the engine behind every earlier one; an error ends the session.
    async fn on_frame(&mut self, frame: Frame) -> Result<()> {
        let i = &self.i;
        let resyncing = self.resyncing;
        let tag_of = |seq: u64| if resyncing { Tag::resync(seq) } else { Tag::seq(seq) };
        let item = match frame {
            Frame::Write { tag, offset, fua, data } => Applied::Op {
                tag,
                bytes: data.len() as u64,
                fua,
                streamed: !resyncing,
                received: Instant::now(),
                done: i.store.enqueue_write(i.volume, offset, data, fua, tag_of(tag)).await?,
            },
            // A resync's scattered blocks, as one engine request.
            Frame::WriteBlocks { tag, lbas, data } if resyncing => {
                let blocks: Vec<(u64, Bytes)> = lbas
                    .iter()
                    .enumerate()
                    .map(|(k, lba)| (*lba, data.slice(k * BLOCK_BYTES..(k + 1) * BLOCK_BYTES)))
                    .collect();
                Applied::Op {
                    tag,
                    bytes: data.len() as u64,
                    fua: false,
                    streamed: false,
                    received: Instant::now(),
                    done: i.store.enqueue_write_blocks(i.volume, blocks, Tag::resync(tag)).await?,
                }
            }
            Frame::WriteBlocks { .. } => {
                return Err(ReplError::refused(Refusal::Protocol, "scattered blocks outside a resync"));
            }
            Frame::Trim { tag, offset, len } => Applied::Op {
                tag,
                bytes: 0,
                fua: false,
                streamed: !resyncing,
                received: Instant::now(),
                done: i.store.enqueue_trim(i.volume, offset, len, tag_of(tag)).await?,
            },
            Frame::Zeroes { tag, offset, len, may_trim, fua } => Applied::Op {
                tag,
                bytes: 0,
                fua,
                streamed: !resyncing,
                received: Instant::now(),
                done: i.store.enqueue_write_zeroes(i.volume, offset, len, may_trim, fua, tag_of(tag)).await?,
            },
            Frame::Flush { upto } => Applied::Flush(upto, i.store.enqueue_flush().await?),
            Frame::CrcRequest { id, offset, len } => {
                Applied::Crcs(id, offset, i.store.enqueue_block_crcs(i.volume, offset, len).await?)
            }
            Frame::Ping { epoch: e, nonce, floor } => {
                if e != self.epoch {
                    let msg = format!("epoch changed mid-session ({} → {e})", self.epoch);
                    return Err(ReplError::refused(Refusal::Protocol, msg));
                }
                self.push(Applied::Floor(floor));
                Applied::Pong(nonce)
            }
            Frame::ResyncBegin { common_tag } => {
                if common_tag != self.common {
                    let msg = format!("resync from {common_tag}, agreed {}", self.common);
                    return Err(ReplError::refused(Refusal::Protocol, msg));
                }
                self.resyncing = true;
                i.state.lock().expect("state").consistent = false;
                i.status.send_modify(|s| {
                    s.resyncing = true;
                    s.consistent = false;
                });
                // Marked as resyncing, durably, before the first resync write lands, and
                // whatever an interrupted earlier resync staged is dropped. The engine stages
                // the resync's writes, so the committed image stays consistent unless the
                // resync outgrows staging (see `state::consistent_replica`).
                let attr = i.state.lock().expect("state").encode();
                i.store.set_repl_staged(i.volume, syncblock_engine::KEEP_LAST_TAG, 0, attr, StagedOp::Discard).await?;
                return Ok(());
            }
            Frame::ResyncCommit { tag, epoch: e, history } => {
                if !self.resyncing || e != self.epoch {
                    return Err(ReplError::refused(Refusal::Protocol, "resync commit without a resync"));
                }
                self.resyncing = false;
                let attr = {
                    let mut s = i.state.lock().expect("state");
                    s.history = history;
                    s.consistent = true;
                    s.encode()
                };
                // Queued here, in stream order: the commit must take effect after every resync
                // write and before every write the primary streams after it (queued by this
                // loop as soon as they arrive). The trim floor restarts at 0 (retain more);
                // heartbeats raise it again.
                let commit = i.store.enqueue_set_repl_staged(i.volume, tag, 0, attr, StagedOp::Commit).await?;
                Applied::Commit(tag, commit)
            }
            other => {
                let msg = format!("unexpected frame from the primary: {other:?}");
                return Err(ReplError::refused(Refusal::Protocol, msg));
            }
        };
        self.push(item);
        Ok(())
    }

    /// Retires completed items (in queue order) and puts the frames they owe the primary in
    /// `out`: pongs and checksum answers in order, then one cumulative `Ack`.
    async fn on_done(&mut self, done: Vec<Result<Done>>, out: &mut Vec<Frame>) -> Result<()> {
        for d in done {
            self.acks.retire(&self.i, out, d?);
        }
        self.acks.after_retiring(&self.i, out).await
    }
}

/// What a completed [`Applied`] item contributes to the acknowledgements.
enum Done {
    Op { tag: u64, durable: bool, received: Instant },
    Flush(u64),
    Commit(u64),
    Pong(u64),
    Floor(u64),
    Crcs(u64, u64, Vec<Option<u32>>),
}

/// Takes every item at the front of `queue` that has completed, in order (less the write data
/// they held from `queued_bytes`); pending while the first has not.
fn poll_done(queue: &mut VecDeque<Applied>, queued_bytes: &mut u64, cx: &mut Context<'_>) -> Poll<Vec<Result<Done>>> {
    let mut done = Vec::new();
    while let Some(head) = queue.front_mut() {
        let d = match head {
            Applied::Op { tag, bytes, fua, streamed, received, done } => match Pin::new(done).poll(cx) {
                Poll::Ready(r) => {
                    *queued_bytes -= *bytes;
                    r.map(|w| Done::Op { tag: *tag, durable: *fua || (*streamed && w.durable), received: *received })
                }
                Poll::Pending => break,
            },
            Applied::Flush(upto, p) => match Pin::new(p).poll(cx) {
                Poll::Ready(r) => r.map(|()| Done::Flush(*upto)),
                Poll::Pending => break,
            },
            Applied::Commit(tag, p) => match Pin::new(p).poll(cx) {
                Poll::Ready(r) => r.map(|()| Done::Commit(*tag)),
                Poll::Pending => break,
            },
            Applied::Crcs(id, offset, p) => match Pin::new(p).poll(cx) {
                Poll::Ready(r) => r.map(|crcs| Done::Crcs(*id, *offset, crcs)),
                Poll::Pending => break,
            },
            Applied::Pong(nonce) => Ok(Done::Pong(*nonce)),
            Applied::Floor(f) => Ok(Done::Floor(*f)),
        };
        queue.pop_front();
        done.push(d.map_err(ReplError::from));
    }
    if done.is_empty() {
        Poll::Pending
    } else {
        Poll::Ready(done)
    }
}

/// The acknowledgement state of a session: cumulative `applied` and `durable` tags, and the trim
/// floor the primary allows.
struct Acks {
    applied: u64,
    durable: u64,
    /// An `Ack` is owed: an operation completed since the last one.
    owed: bool,
    /// The floor the primary's heartbeats allow, and its record.
    want_floor: u64,
    floor: FloorRecord,
    /// See [`SecondaryStatus::apply_ops`].
    apply_ops: u64,
    apply_us: u64,
}

impl Acks {
    fn new(floor: u64) -> Acks {
        Acks {
            applied: 0,
            durable: 0,
            owed: false,
            want_floor: floor,
            floor: FloorRecord::new(floor, Instant::now()),
            apply_ops: 0,
            apply_us: 0,
        }
    }

    fn retire(&mut self, i: &Inner, out: &mut Vec<Frame>, done: Done) {
        match done {
            Done::Op { tag, durable, received } => {
                self.apply_ops += 1;
                self.apply_us += received.elapsed().as_micros() as u64;
                self.applied = self.applied.max(tag);
                if durable {
                    self.durable = self.durable.max(tag);
                }
                self.owed = true;
            }
            Done::Flush(upto) => {
                self.durable = self.durable.max(upto);
                self.owed = true;
            }
            Done::Commit(tag) => {
                // Durable when it completes, with every write before it: the engine applies every
                // staged resync block in this one record.
                self.floor.reset(0);
                self.applied = tag;
                self.durable = tag;
                self.owed = true;
                i.status.send_modify(|s| {
                    s.resyncing = false;
                    s.consistent = true;
                });
                tracing::info!(volume = %i.name, "resync committed at tag {tag}");
            }
            Done::Pong(nonce) => out.push(Frame::Pong { nonce }),
            Done::Crcs(id, offset, crcs) => out.push(Frame::CrcReply { id, offset, crcs }),
            Done::Floor(f) => self.want_floor = self.want_floor.max(f),
        }
    }

    /// Persists a raised trim floor now and then, and acknowledges what completed: one cumulative
    /// `Ack` for everything retired together.
    async fn after_retiring(&mut self, i: &Inner, out: &mut Vec<Frame>) -> Result<()> {
        if i.status.borrow().consistent {
            if let Some(floor) = self.floor.due(self.want_floor, Instant::now()) {
                let attr = i.state.lock().expect("state").encode();
                let r = FloorRecord::record(&i.store, i.volume, floor, attr).await;
                self.floor.written(floor, r.is_ok());
                r?;
            }
        }
        if self.owed {
            self.owed = false;
            out.push(Frame::Ack { applied: self.applied, durable: self.durable });
            let (ops, us) = (std::mem::take(&mut self.apply_ops), std::mem::take(&mut self.apply_us));
            i.status.send_modify(|s| {
                s.applied = s.applied.max(self.applied);
                s.durable = s.durable.max(self.durable);
                s.apply_ops += ops;
                s.apply_us += us;
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! The session driven by synthetic frames, on a store on a simulated disk: what it queues,
    //! in which order, and what it owes the primary.

    use super::*;
    use bytes::Bytes;
    use syncblock_engine::BLOCK_BYTES_U64;

    const VOL: u64 = 4 << 20;
    const EPOCH: Epoch = Epoch(2);

    async fn session(common: u64) -> Session {
        let (store, info) = crate::testutil::sim_store(VOL).await;
        let inner = Arc::new(Inner {
            store,
            volume: info.id,
            name: "v".into(),
            size_bytes: VOL,
            cfg: ReplConfig::default(),
            state: Mutex::new(ReplState::new(Role::Secondary)),
            status: watch::channel(SecondaryStatus::default()).0,
            stop: watch::channel(false).0,
        });
        Session::new(inner, EPOCH, common, 0)
    }

    fn write(tag: u64, lba: u64, fua: bool) -> Frame {
        Frame::Write {
            tag,
            offset: lba * BLOCK_BYTES_U64,
            fua,
            data: Bytes::from(vec![tag as u8; BLOCK_BYTES_U64 as usize]),
        }
    }

    /// Feeds `frames`, then retires everything they queued; returns the frames owed.
    async fn feed(s: &mut Session, frames: Vec<Frame>) -> Result<Vec<Frame>> {
        for f in frames {
            s.on_frame(f).await?;
        }
        let mut out = Vec::new();
        while !s.queue.is_empty() {
            let done = std::future::poll_fn(|cx| poll_done(&mut s.queue, &mut s.queued_bytes, cx)).await;
            s.on_done(done, &mut out).await?;
        }
        Ok(out)
    }

    fn acks(out: &[Frame]) -> Vec<(u64, u64)> {
        out.iter()
            .filter_map(|f| if let Frame::Ack { applied, durable } = f { Some((*applied, *durable)) } else { None })
            .collect()
    }

    #[tokio::test]
    async fn writes_are_acknowledged_cumulatively_and_a_flush_makes_them_durable() {
        let mut s = session(0).await;
        let out = feed(&mut s, vec![write(1, 0, false), write(2, 1, false), write(3, 2, false)]).await.unwrap();
        let a = acks(&out);
        assert_eq!(a.last().map(|a| a.0), Some(3), "{out:?}");
        assert!(a.iter().all(|&(applied, durable)| durable <= applied));
        let out = feed(&mut s, vec![Frame::Flush { upto: 3 }]).await.unwrap();
        assert_eq!(acks(&out), [(3, 3)]);
        // A FUA write is durable with everything before it when it completes.
        let out = feed(&mut s, vec![write(4, 3, false), write(5, 4, true)]).await.unwrap();
        assert_eq!(acks(&out).last(), Some(&(5, 5)));
    }

    /// The apply queue is bounded by the write data it holds and by its length: a stream of
    /// large writes stops being read at `APPLY_QUEUE_BYTES`, one of small operations at
    /// `APPLY_QUEUE`, and retiring them makes room again.
    #[tokio::test]
    async fn the_apply_queue_is_bounded_by_bytes_and_by_operations() {
        let mut s = session(0).await;
        let big = |tag| Frame::Write { tag, offset: 0, fua: false, data: Bytes::from(vec![tag as u8; 1 << 20]) };
        let n = APPLY_QUEUE_BYTES >> 20;
        for tag in 1..=n {
            assert!(s.has_room(), "room for write {tag} of {n}");
            s.on_frame(big(tag)).await.unwrap();
        }
        assert!(!s.has_room(), "{} MiB queued", s.queued_bytes >> 20);
        assert_eq!(feed(&mut s, vec![]).await.unwrap().len(), 1, "one cumulative ack");
        assert_eq!((s.queued_bytes, s.has_room()), (0, true));
        for tag in n + 1..=n + APPLY_QUEUE as u64 {
            assert!(s.has_room(), "room for trim {tag}");
            s.on_frame(Frame::Trim { tag, offset: 0, len: BLOCK_BYTES_U64 }).await.unwrap();
        }
        assert!(!s.has_room());
        feed(&mut s, vec![]).await.unwrap();
        assert!(s.has_room());
    }

    #[tokio::test]
    async fn a_checksum_request_is_answered_at_its_place_in_the_stream() {
        let mut s = session(0).await;
        let ask = |id| Frame::CrcRequest { id, offset: 0, len: 2 * BLOCK_BYTES_U64 };
        let out = feed(&mut s, vec![ask(1), write(1, 1, false), ask(2)]).await.unwrap();
        let replies: Vec<(u64, Vec<Option<u32>>)> = out
            .iter()
            .filter_map(|f| if let Frame::CrcReply { id, crcs, .. } = f { Some((*id, crcs.clone())) } else { None })
            .collect();
        assert_eq!(replies.len(), 2);
        assert_eq!(replies[0], (1, vec![None, None]), "the first request saw the write queued after it");
        assert_eq!(replies[1].1[0], None);
        assert!(replies[1].1[1].is_some(), "the second request missed the write queued before it");
    }

    #[tokio::test]
    async fn a_resync_is_invisible_until_its_commit_applies_it_at_once() {
        let mut s = session(0).await;
        let (store, volume) = (s.i.store.clone(), s.i.volume);
        let history = vec![crate::wire::EpochStart { epoch: EPOCH, start_tag: 1, origin: 5 }];
        feed(&mut s, vec![Frame::ResyncBegin { common_tag: 0 }, write(7, 0, false), write(8, 1, false)]).await.unwrap();
        assert!(!s.i.state.lock().unwrap().consistent, "not marked inconsistent during the resync");
        assert_eq!(store.volume_info(volume).await.unwrap().last_tag, 0, "the resync moved the last tag");
        let out =
            feed(&mut s, vec![Frame::ResyncCommit { tag: 8, epoch: EPOCH, history: history.clone() }]).await.unwrap();
        assert_eq!(acks(&out).last(), Some(&(8, 8)), "the commit is durable with everything before it");
        let info = store.volume_info(volume).await.unwrap();
        assert_eq!((info.last_tag, info.staged_blocks), (8, 0));
        let st = s.i.state.lock().unwrap().clone();
        assert!(st.consistent);
        assert_eq!(st.history, history);
        assert_eq!(
            &store.read(volume, BLOCK_BYTES_U64, BLOCK_BYTES_U64).await.unwrap()[..],
            &vec![8u8; BLOCK_BYTES_U64 as usize][..]
        );
    }

    /// A resync's scattered blocks (`WriteBlocks`) go into the engine as one request each, every
    /// block landing where its LBA says, in the frame's order (the last of two writes of a block
    /// wins); outside a resync such a frame ends the session.
    #[tokio::test]
    async fn a_resyncs_scattered_blocks_are_applied_as_one_request() {
        let mut s = session(0).await;
        let blocks = |tag: u64, lbas: &[u64]| {
            let mut data = bytes::BytesMut::new();
            for (k, lba) in lbas.iter().enumerate() {
                data.extend_from_slice(&vec![(tag as u8) ^ (*lba as u8) ^ (k as u8); BLOCK_BYTES]);
            }
            Frame::WriteBlocks { tag, lbas: lbas.to_vec(), data: data.freeze() }
        };
        let e = feed(&mut s, vec![blocks(1, &[3])]).await.unwrap_err();
        assert!(e.to_string().contains("outside a resync"), "{e}");
        let mut s = session(0).await;
        s.on_frame(Frame::ResyncBegin { common_tag: 0 }).await.unwrap();
        let queued = s.queue.len();
        let first: Vec<u64> = (0..256u64).rev().map(|k| k * 3).collect();
        s.on_frame(blocks(1, &first)).await.unwrap();
        s.on_frame(blocks(2, &[7, 900, 7])).await.unwrap();
        assert_eq!(s.queue.len() - queued, 2, "one engine request per frame");
        assert_eq!(s.queued_bytes, 259 * BLOCK_BYTES_U64);
        let out = feed(&mut s, vec![Frame::Ping { epoch: EPOCH, nonce: 1, floor: 0 }]).await.unwrap();
        assert_eq!(acks(&out).last().map(|a| a.0), Some(2), "{out:?}");
        assert_eq!(s.queued_bytes, 0);
        let (store, volume) = (s.i.store.clone(), s.i.volume);
        for (lba, want) in
            [(0, 1 ^ 255u8), (765, 1 ^ (765 % 256) as u8), (900, 2 ^ (900 % 256) as u8 ^ 1), (7, 2 ^ 7 ^ 2)]
        {
            let got = store.read(volume, lba * BLOCK_BYTES_U64, BLOCK_BYTES_U64).await.unwrap();
            assert!(got.iter().all(|&b| b == want), "block {lba}: {} against {want}", got[0]);
        }
    }

    #[tokio::test]
    async fn frames_that_break_the_session_rules_end_it() {
        let mut s = session(5).await;
        let e = feed(&mut s, vec![Frame::Ping { epoch: EPOCH.next(), nonce: 1, floor: 0 }]).await.unwrap_err();
        assert_eq!(e.refusal(), Some(Refusal::Protocol), "{e}");
        let mut s = session(5).await;
        let e = feed(&mut s, vec![Frame::ResyncBegin { common_tag: 4 }]).await.unwrap_err();
        assert!(e.to_string().contains("agreed 5"), "{e}");
        let mut s = session(5).await;
        let commit = Frame::ResyncCommit { tag: 9, epoch: EPOCH, history: vec![] };
        let e = feed(&mut s, vec![commit]).await.unwrap_err();
        assert!(e.to_string().contains("without a resync"), "{e}");
        let mut s = session(5).await;
        let e = feed(&mut s, vec![Frame::Ack { applied: 1, durable: 1 }]).await.unwrap_err();
        assert!(e.to_string().contains("unexpected frame"), "{e}");
    }

    #[tokio::test]
    async fn pings_are_answered_in_stream_order() {
        let mut s = session(0).await;
        let out =
            feed(&mut s, vec![write(1, 0, false), Frame::Ping { epoch: EPOCH, nonce: 9, floor: 0 }]).await.unwrap();
        // The pong is retired only after the write queued before the ping, and the ack covering
        // that write goes out with it: a primary that sees the pong sees the write applied.
        assert!(out.iter().any(|f| matches!(f, Frame::Pong { nonce: 9 })), "{out:?}");
        assert!(acks(&out).iter().any(|a| a.0 >= 1), "{out:?}");
    }
}
