//! The primary side of a replicated volume.
//!
//! [`Primary`] is a handle: every operation goes to the volume's *owner* (`owner.rs`), one task
//! whose loop holds all of the primary's replication state and applies one event at a time — a
//! client operation, an engine completion, a frame from the peer, the link coming up or going
//! down, a timer, a witness answer. The loop is the *sequencer*: it assigns each write its tag,
//! queues it in the local engine and on the link in one step, so the engine's order, the tag order
//! and the link order are one order. The local write and the peer's copy then proceed in parallel,
//! and the client's answer waits for both (the ack rule, `docs/replication.md`).
//!
//! The link's reader and writer tasks only move bytes (`link.rs`). On every connection the loop
//! says hello, resyncs what the peer lacks (a step per turn of the loop, each at a point of the
//! order, so a resync read and a concurrent client write reach the peer in the order they reached
//! the local engine) and streams. A peer that shares no history gets a *full sync* that compares
//! block checksums window by window and ships only the blocks that differ; [`Primary::verify`]
//! compares both replicas the same way while I/O continues. Both rest on `CrcRequest`, which the
//! peer answers at its place in the stream.
//!
//! `status` reads what the loop published; it never waits for the loop.

mod compare;
mod lag;
mod link;
mod owner;
mod report;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use syncblock_engine::{Epoch, Store, VolumeId};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

pub use owner::Stages;
pub use report::{PeerView, PrimaryStatus, Progress, VerifyReport};

use crate::state::{ReplState, Role};
use crate::witness::Grant;
use crate::{ReplConfig, ReplError, Result};
use owner::{Command, Owner, Published};

struct Handle {
    commands: mpsc::Sender<(Instant, Command)>,
    peer: Arc<watch::Sender<PeerView>>,
    deposed: Arc<watch::Sender<Option<String>>>,
    handed_over: Arc<std::sync::atomic::AtomicU64>,
    published: watch::Receiver<Published>,
    stop: watch::Sender<bool>,
    volume: VolumeId,
    name: String,
    epoch: Epoch,
    pair: u64,
    policy: crate::Policy,
}

/// The primary of one replicated volume. Cheap to clone.
#[derive(Clone)]
pub struct Primary {
    inner: Arc<Handle>,
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
        if !crate::state::consistent_replica(&info) {
            return Err(ReplError::Invalid(format!(
                "volume {volume_name} holds a half-applied resync; it cannot become primary: resync it from its \
                 peer first"
            )));
        }
        let epoch = granted.as_ref().map_or(state.epoch.next(), |g| g.epoch);
        if epoch <= state.epoch {
            return Err(ReplError::Invalid(format!(
                "granted epoch {epoch} is not newer than this node's epoch {}",
                state.epoch
            )));
        }
        state.begin_epoch(epoch, info.last_tag + 1, crate::wire::new_origin());
        if state.pair == 0 {
            // The pair's first primary names the pair; its secondary takes the id at the first
            // sync, and the witness keys its record by it.
            state.pair = crate::wire::new_origin();
        }
        tracing::info!(
            volume = volume_name,
            epoch = epoch.0,
            pair = format!("{:016x}", state.pair),
            "taking the primary role"
        );
        // Retain trims until the peer confirms it has them (the floor rises as it does). An
        // interrupted resync this node was receiving is dropped: its committed image is what it
        // serves.
        state.consistent = true;
        let floor = crate::state::record_state(&store, &info, &state, syncblock_engine::StagedOp::Discard).await?;
        let solo_until = granted
            .as_ref()
            .filter(|g| g.solo && cfg.policy == crate::Policy::Degrade && cfg.authority.is_some())
            .map(|g| g.valid_until);
        let (pair, policy) = (state.pair, cfg.policy);
        let (owner, parts) = Owner::new(
            store,
            info.id,
            volume_name.to_string(),
            info.size_bytes,
            peer_addr,
            cfg,
            state,
            info.last_tag,
            floor,
            solo_until,
        );
        tokio::spawn(owner.run());
        Ok(Primary {
            inner: Arc::new(Handle {
                commands: parts.commands,
                peer: parts.peer,
                deposed: parts.deposed,
                handed_over: parts.handed_over,
                published: parts.published,
                stop: parts.stop,
                volume: info.id,
                name: volume_name.to_string(),
                epoch,
                pair,
                policy,
            }),
        })
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
        let mut w = self.inner.deposed.subscribe();
        let why = match w.wait_for(|v| v.is_some()).await {
            Ok(v) => v.clone().unwrap_or_default(),
            Err(_) => "primary dropped".into(),
        };
        why
    }

    /// The epoch in which a switchover made the peer primary, once this primary was deposed by
    /// one. The node steps down having seen that epoch: if the new primary dies before it takes
    /// the role, this node holds every write the volume acknowledged (none can have been
    /// acknowledged in the new epoch without it, the grant leaving the pair not solo) and may take
    /// the role back by the ordinary rules, which refuse a node that has seen an older epoch only.
    pub fn handed_over(&self) -> Option<Epoch> {
        match self.inner.handed_over.load(std::sync::atomic::Ordering::Acquire) {
            0 => None,
            e => Some(Epoch(e)),
        }
    }

    /// Resolves when this primary is stopped or deposed.
    pub async fn stopped(&self) {
        let mut stop = self.inner.stop.subscribe();
        let mut deposed = self.inner.deposed.subscribe();
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => {}
            _ = deposed.wait_for(|v| v.is_some()) => {}
        }
    }

    /// Replicates to a peer at `addr` from now on (the link in use is dropped). Writes go on: those
    /// waiting for the old peer's acknowledgement wait for the new one's resync, or for solo
    /// consent, as after any lost link.
    pub async fn repeer(&self, addr: std::net::SocketAddr) -> Result<()> {
        self.inner
            .commands
            .send((Instant::now(), Command::Repeer(addr)))
            .await
            .map_err(|_| ReplError::Stopped("the primary stopped".into()))
    }

    /// Marks this primary deposed (a newer epoch exists): waiting and new writes fail.
    pub fn depose(&self, why: String) {
        if self.inner.commands.try_send((Instant::now(), Command::Depose(why.clone()))).is_err() {
            // The loop is busy (or gone): mark it directly; the loop sees it at its next turn.
            if self.inner.deposed.borrow().is_none() {
                self.inner.peer.send_modify(|v| v.deposed = Some(why.clone()));
                self.inner.deposed.send_replace(Some(why));
            }
        }
    }

    /// Whether both handles are the same primary (not merely of the same volume).
    pub fn same(&self, other: &Primary) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    pub fn epoch(&self) -> Epoch {
        self.inner.epoch
    }

    /// The pair's id (see [`ReplState::pair`]).
    pub fn pair(&self) -> u64 {
        self.inner.pair
    }

    /// What the loop last published; never waits for it.
    pub async fn status(&self) -> PrimaryStatus {
        let p = self.inner.published.borrow().clone();
        let now = Instant::now();
        PrimaryStatus {
            volume: self.inner.name.clone(),
            epoch: self.inner.epoch,
            policy: self.inner.policy,
            waiting: p.waiting,
            waiting_oldest: p.waiting_since.map(|t| now.saturating_duration_since(t)),
            last_tag: p.last_tag,
            lag_bytes: p.lag_bytes,
            lag_age: p.lag_since.map(|t| now.saturating_duration_since(t)),
            witness: p.witness,
            stages: p.stages,
            peer: self.inner.peer.borrow().clone(),
        }
    }

    /// A watch on the peer's state (for tests and status).
    pub fn peer_view(&self) -> watch::Receiver<PeerView> {
        self.inner.peer.subscribe()
    }

    fn check_role(&self) -> Result<()> {
        match &*self.inner.deposed.borrow() {
            Some(why) => Err(ReplError::Stopped(format!("deposed: {why}"))),
            None if *self.inner.stop.borrow() => Err(ReplError::Stopped("replication stopped".into())),
            None => Ok(()),
        }
    }

    /// Sends `command` (made with a reply channel) to the loop and waits for its answer.
    async fn call<T>(&self, command: impl FnOnce(oneshot::Sender<Result<T>>) -> Command) -> Result<T> {
        self.check_role()?;
        let (tx, rx) = oneshot::channel();
        let gone = || match &*self.inner.deposed.borrow() {
            Some(why) => ReplError::Stopped(format!("deposed: {why}")),
            None => ReplError::Stopped("replication stopped".into()),
        };
        self.inner.commands.send((Instant::now(), command(tx))).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.write_tagged(offset, data, fua).await.map(|_| ())
    }

    /// [`Primary::write`], returning the write's tag: its place in the volume's history.
    pub async fn write_tagged(&self, offset: u64, data: Bytes, fua: bool) -> Result<u64> {
        self.call(|reply| Command::Write { offset, data, fua, reply }).await
    }

    pub async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.call(|reply| Command::Trim { offset, len, reply }).await.map(|_| ())
    }

    pub async fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> Result<()> {
        self.call(|reply| Command::Zeroes { offset, len, may_trim, fua, reply }).await.map(|_| ())
    }

    /// Makes every write completed before the call durable on both nodes.
    pub async fn flush(&self) -> Result<()> {
        self.call(|reply| Command::Flush { reply }).await.map(|_| ())
    }

    /// Compares both replicas block by block, by the checksums each engine keeps in its index,
    /// while I/O continues, and reports the ranges that differ; with `repair`, also rewrites them
    /// on the peer from the primary's copy. Needs a connected peer in sync; fails if the link is
    /// lost (or replaced) during the pass.
    ///
    /// Each window is compared at one point of the order: the loop queues a checksum request in
    /// its own engine and a `CrcRequest` on the link in one step. The primary's answer is its
    /// image after every operation queued before that point; the peer's is its image after every
    /// frame before the request: the same operations in the same order, since an in-sync peer
    /// holds the whole history before the link and the link carries the sequencer's order. A
    /// write racing with the pass lands on the same side of that point on both nodes, so it never
    /// shows as a difference.
    pub async fn verify(&self, repair: bool) -> Result<VerifyReport> {
        self.call(|reply| Command::Verify { repair, reply }).await
    }

    /// Hands the primary role to the peer node `to`, a planned switchover (`owner/handover.rs`):
    /// new client operations wait while those in flight are confirmed by the peer, then the
    /// authority makes `to` primary in the next epoch and this primary steps down (its waiting
    /// operations fail, as at any deposition). Refused at once unless the peer is in sync; given
    /// up, with writes continuing here, if the peer does not confirm what is in flight within 5 s.
    pub async fn hand_over(&self, to: &str) -> Result<Grant> {
        self.call(|reply| Command::HandOver { to: to.to_string(), reply }).await
    }
}
