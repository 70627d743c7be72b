//! The secondary side: accepts its primary's connection and applies the stream to the local store
//! in the primary's order, acknowledging cumulatively.
//!
//! One task reads frames and queues each into the engine in arrival order (the engine's log order is
//! its queue order, so the local log is the primary's order); a second task waits for those engine
//! results in the same order and sends `Ack { applied, durable }`. A resync is applied like any
//! stream, but its writes are marked so they do not move the volume's last tag; the commit moves it
//! in one durable record. Until then the replica is marked inconsistent and refuses promotion.
//!
//! A `CrcRequest` is queued into the engine like any frame, so its answer (the block checksums
//! from the index) is the image after every earlier frame: the point in the stream where the
//! primary took its own checksums, for full sync and verify.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use syncblock_engine::{Pending, Since, StagedOp, Store, Tag, VolumeId, Written};
use tokio::sync::{mpsc, watch};

use crate::link::{read_frame, write_frame};
use crate::net::{BoxListener, BoxStream};
use crate::state::{common_point, ReplState, Role};
use crate::wire::{Frame, MAX_HELLO_RUNS};
use crate::{ReplConfig, ReplError, Result};

/// Engine operations queued but not yet acknowledged to the primary. Bounds the memory a fast
/// primary can pin on a slow secondary (each holds at most one ≤ 32 MiB write); when full, the
/// reader stops reading the socket and TCP pushes back.
const APPLY_QUEUE: usize = 256;
/// Trim-floor updates (a meta record each) are written at most this often.
const FLOOR_PERIOD: Duration = Duration::from_secs(5);

/// A snapshot for `syncblock status`.
#[derive(Debug, Clone, Default)]
pub struct SecondaryStatus {
    pub volume: String,
    pub epoch: u64,
    pub connected: bool,
    pub primary: Option<String>,
    pub consistent: bool,
    pub resyncing: bool,
    pub applied: u64,
    pub durable: u64,
    pub last_error: Option<String>,
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
        fua: bool,
        streamed: bool,
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
            tracing::info!(volume = volume_name, epoch = state.epoch, "taking the secondary role");
            state.role = Role::Secondary;
        }
        let floor = info.trim_floor.min(info.last_tag);
        store.set_repl(info.id, syncblock_engine::KEEP_LAST_TAG, floor, state.encode()).await?;
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

async fn accept_loop(i: Arc<Inner>, mut listener: BoxListener) {
    // One session at a time: a new connection (say, after the primary restarted) replaces the
    // current one, which may be a dead link not yet timed out.
    let mut current: Option<(tokio::task::JoinHandle<()>, watch::Sender<bool>)> = None;
    let mut stopped = i.stop.subscribe();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => Some(a),
            _ = stopped.wait_for(|s| *s) => None,
        };
        let Some(accepted) = accepted else {
            if let Some((task, stop)) = current.take() {
                let _ = stop.send(true);
                let _ = task.await;
            }
            return;
        };
        let (stream, from) = match accepted {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("replication accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if let Some((task, stop)) = current.take() {
            let _ = stop.send(true);
            let _ = task.await;
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let i2 = i.clone();
        let task = tokio::spawn(async move {
            let r = session(&i2, stream, from, stop_rx).await;
            let msg = match r {
                Ok(()) => None,
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

async fn session(i: &Arc<Inner>, stream: BoxStream, from: SocketAddr, mut stop: watch::Receiver<bool>) -> Result<()> {
    let (mut rd, mut wr) = crate::net::split(stream);
    let hello = read_frame(&mut rd, i.cfg.timeout).await?;
    let Frame::Hello { epoch, last_tag: primary_last, size_bytes, volume, node, history } = hello else {
        let msg = "expected a hello".to_string();
        let _ = write_frame(&mut wr, &Frame::Refuse { reason: msg.clone() }).await;
        return Err(ReplError::Refused(msg));
    };
    let info = i.store.volume_info(i.volume).await?;
    let refuse = if volume != i.name {
        Some(format!("this node replicates volume {:?}, not {volume:?}", i.name))
    } else if size_bytes != i.size_bytes {
        Some(format!(
            "volume {volume} is {size_bytes} bytes on the primary but {} bytes here: resize one side",
            i.size_bytes
        ))
    } else if epoch < i.state.lock().expect("state").epoch {
        Some(format!(
            "stale epoch {epoch}: this node has seen epoch {}; {node} was deposed and must rejoin as secondary",
            i.state.lock().expect("state").epoch
        ))
    } else {
        None
    };
    if let Some(reason) = refuse {
        tracing::warn!(volume = %i.name, %from, "refusing primary {node}: {reason}");
        let _ = write_frame(&mut wr, &Frame::Refuse { reason: reason.clone() }).await;
        return Err(ReplError::Refused(reason));
    }
    // Accepting a primary of a newer epoch is recorded before anything of it is applied.
    let (my_history, consistent) = {
        let mut s = i.state.lock().expect("state");
        s.epoch = epoch;
        (s.history.clone(), s.consistent)
    };
    persist(i, info.last_tag, info.trim_floor).await?;
    let mut common = common_point(&history, primary_last, &my_history, info.last_tag);
    let mut runs = Vec::new();
    if common > 0 && (info.last_tag > common || !consistent) {
        // Writes this replica holds beyond the shared history (a deposed primary's tail, or a
        // half-applied resync): the primary overwrites them with its own data.
        runs =
            i.store.changed_since(i.volume, Since::Tag(common)).await?.iter().map(|r| (r.lba.0, r.n_blocks)).collect();
        if runs.len() > MAX_HELLO_RUNS {
            common = 0;
            runs.clear();
        }
    }
    tracing::info!(volume = %i.name, %from, primary = %node, epoch, common, my_last = info.last_tag, divergent_runs = runs.len(), "primary connected");
    write_frame(&mut wr, &Frame::HelloOk { last_tag: info.last_tag, common_tag: common, runs }).await?;
    i.status.send_modify(|s| {
        s.connected = true;
        s.primary = Some(node.clone());
        s.epoch = epoch;
        s.last_error = None;
    });

    let (tx, rx) = mpsc::channel::<Applied>(APPLY_QUEUE);
    let acker = tokio::spawn(ack_loop(i.clone(), wr, rx, info.trim_floor));
    let mut resyncing = false;
    let reader = async {
        loop {
            let frame = tokio::select! {
                f = read_frame(&mut rd, i.cfg.timeout) => f?,
                _ = stop.wait_for(|s| *s) => return Err(ReplError::Stopped("session closed (node stopping, or a newer connection replaced it)".into())),
            };
            let tag_of = |seq: u64| if resyncing { Tag::resync(seq) } else { Tag::seq(seq) };
            let item = match frame {
                Frame::Write { tag, offset, fua, data } => Applied::Op {
                    tag,
                    fua,
                    streamed: !resyncing,
                    done: i.store.enqueue_write(i.volume, offset, data, fua, tag_of(tag)).await?,
                },
                Frame::Trim { tag, offset, len } => Applied::Op {
                    tag,
                    fua: false,
                    streamed: !resyncing,
                    done: i.store.enqueue_trim(i.volume, offset, len, tag_of(tag)).await?,
                },
                Frame::Zeroes { tag, offset, len, may_trim, fua } => Applied::Op {
                    tag,
                    fua,
                    streamed: !resyncing,
                    done: i.store.enqueue_write_zeroes(i.volume, offset, len, may_trim, fua, tag_of(tag)).await?,
                },
                Frame::Flush { upto } => Applied::Flush(upto, i.store.enqueue_flush().await?),
                Frame::CrcRequest { id, offset, len } => {
                    Applied::Crcs(id, offset, i.store.enqueue_block_crcs(i.volume, offset, len).await?)
                }
                Frame::Ping { epoch: e, nonce, floor } => {
                    if e != epoch {
                        return Err(ReplError::Refused(format!("epoch changed mid-session ({epoch} → {e})")));
                    }
                    let _ = tx.send(Applied::Floor(floor)).await;
                    Applied::Pong(nonce)
                }
                Frame::ResyncBegin { common_tag } => {
                    if common_tag != common {
                        return Err(ReplError::Refused(format!("resync from {common_tag}, agreed {common}")));
                    }
                    resyncing = true;
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
                    i.store
                        .set_repl_staged(i.volume, syncblock_engine::KEEP_LAST_TAG, 0, attr, StagedOp::Discard)
                        .await?;
                    continue;
                }
                Frame::ResyncCommit { tag, epoch: e, history } => {
                    if !resyncing || e != epoch {
                        return Err(ReplError::Refused("resync commit without a resync".into()));
                    }
                    resyncing = false;
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
                other => return Err(ReplError::Refused(format!("unexpected frame from the primary: {other:?}"))),
            };
            if tx.send(item).await.is_err() {
                return Err(ReplError::Stopped("acknowledger stopped".into()));
            }
        }
    };
    let r: Result<()> = reader.await;
    drop(tx);
    let acked = acker.await.map_err(|e| ReplError::Stopped(e.to_string()))?;
    r.and(acked)
}

async fn ack_loop(
    i: Arc<Inner>,
    mut wr: crate::net::WritePart,
    mut rx: mpsc::Receiver<Applied>,
    mut floor: u64,
) -> Result<()> {
    let mut applied = 0u64;
    let mut durable = 0u64;
    let mut floor_written = Instant::now();
    let mut want_floor = floor;
    while let Some(item) = rx.recv().await {
        match item {
            Applied::Op { tag, fua, streamed, done } => {
                let written = done.wait().await?;
                applied = applied.max(tag);
                if fua || (streamed && written.durable) {
                    durable = durable.max(tag);
                }
            }
            Applied::Flush(upto, p) => {
                p.wait().await?;
                durable = durable.max(upto);
            }
            Applied::Commit(tag, commit) => {
                // Durable when it completes, with every write before it: the engine applies every
                // staged resync block in this one record.
                commit.wait().await?;
                floor = 0;
                applied = tag;
                durable = tag;
                i.status.send_modify(|s| {
                    s.resyncing = false;
                    s.consistent = true;
                });
                tracing::info!(volume = %i.name, "resync committed at tag {tag}");
            }
            Applied::Pong(nonce) => write_frame(&mut wr, &Frame::Pong { nonce }).await?,
            Applied::Crcs(id, offset, p) => {
                let crcs = p.wait().await?;
                write_frame(&mut wr, &Frame::CrcReply { id, offset, crcs }).await?;
            }
            Applied::Floor(f) => want_floor = want_floor.max(f),
        }
        if want_floor > floor && floor_written.elapsed() >= FLOOR_PERIOD && i.status.borrow().consistent {
            let attr = i.state.lock().expect("state").encode();
            i.store.set_repl(i.volume, syncblock_engine::KEEP_LAST_TAG, want_floor, attr).await?;
            floor = want_floor;
            floor_written = Instant::now();
        }
        // Acknowledge once the queue has nothing more that is already done: cumulative acks.
        if rx.is_empty() {
            write_frame(&mut wr, &Frame::Ack { applied, durable }).await?;
            i.status.send_modify(|s| {
                s.applied = s.applied.max(applied);
                s.durable = s.durable.max(durable);
            });
        }
    }
    Ok(())
}
