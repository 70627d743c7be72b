//! One node's side of a replicated volume across role changes: it runs a [`Primary`] or a
//! [`Secondary`], promotes itself (by hand, or automatically when its primary is gone and the
//! witness agrees), and steps down to secondary when it learns it was deposed, so that the new
//! primary can roll back its unreplicated writes and resync it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use syncblock_engine::{Epoch, Store};
use tokio::sync::watch;

use crate::primary::{Primary, PrimaryStatus};
use crate::secondary::{Secondary, SecondaryStatus};
use crate::state::{ReplState, Role};
use crate::wire::{Frame, Refusal};
use crate::witness::Grant;
use crate::{Policy, ReplConfig, ReplError, Result};

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Where a node reaches its peer and is reached by it.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub volume: String,
    /// This node's replication listener (used while it is secondary).
    pub repl_listen: SocketAddr,
    /// The peer's replication listener (dialed while this node is primary).
    pub peer: SocketAddr,
    /// Promote automatically when the primary has been silent for the timeout and the witness
    /// agrees. Needs a witness.
    pub auto_failover: bool,
    pub repl: ReplConfig,
}

enum Current {
    Primary(Primary),
    Secondary(Secondary),
    Stopped,
}

struct Inner {
    store: Store,
    cfg: NodeConfig,
    current: Mutex<Current>,
    /// Serialises role changes.
    changing: tokio::sync::Mutex<()>,
    /// Bumped on every role change, for watchers.
    role_changes: watch::Sender<u64>,
    stop: watch::Sender<bool>,
    /// When this node last became primary, for failover measurements.
    promoted_at: Mutex<Option<Instant>>,
    /// The peer's replication address and name (`cfg.peer` and `cfg.repl.peer_node` until
    /// [`Node::set_peer`] moves them).
    peer: Mutex<(SocketAddr, Option<String>)>,
}

/// A node's replicated volume. Cheap to clone.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("volume", &self.inner.cfg.volume).finish_non_exhaustive()
    }
}

/// Status of either role, for `syncblock status`.
// A snapshot built once per status request; boxing the primary's side would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum NodeStatus {
    Primary(PrimaryStatus),
    Secondary(SecondaryStatus),
    /// Between roles, or stopping.
    Stopped {
        volume: String,
    },
}

impl NodeStatus {
    /// The serialisable view (`GET /status`).
    pub fn view(&self) -> crate::status::StatusView {
        self.into()
    }
}

impl Node {
    /// Starts in the role the volume last had on this store, or `initial` the first time.
    pub async fn start(store: Store, cfg: NodeConfig, initial: Role) -> Result<Node> {
        let info = store.volume(&cfg.volume).await?;
        let role = ReplState::decode(&info.attr).map(|s| s.role).unwrap_or(initial);
        if role != initial {
            let name = |r: Role| if r == Role::Primary { "primary" } else { "secondary" };
            tracing::info!(
                volume = %cfg.volume,
                "this store was last {} (the role it had wins over --role {}){}",
                name(role),
                name(initial),
                if role == Role::Primary && cfg.repl.authority.is_some() {
                    "; asking the witness whether it still is the primary"
                } else {
                    ""
                }
            );
        }
        if cfg.auto_failover && cfg.repl.authority.is_none() {
            return Err(ReplError::Invalid("automatic failover needs a witness (--witness)".into()));
        }
        if cfg.repl.policy == Policy::Degrade && cfg.repl.authority.is_none() {
            return Err(ReplError::Invalid("the degrade policy needs a witness (--witness)".into()));
        }
        if cfg.repl.policy == Policy::Strict && cfg.auto_failover {
            return Err(ReplError::Invalid(
                "the strict policy waits for the peer, and after an automatic failover the peer is the node \
                 that died: the new primary could never write. Use the default policy (degrade: the survivor \
                 serves alone with the witness's consent) or add --no-auto-failover (promote by hand)"
                    .into(),
            ));
        }
        let peer = (cfg.peer, cfg.repl.peer_node.clone());
        let node = Node {
            inner: Arc::new(Inner {
                store,
                cfg,
                current: Mutex::new(Current::Stopped),
                changing: tokio::sync::Mutex::new(()),
                role_changes: watch::channel(0).0,
                stop: watch::channel(false).0,
                promoted_at: Mutex::new(None),
                peer: Mutex::new(peer),
            }),
        };
        match role {
            Role::Primary if node.inner.cfg.repl.authority.is_some() => node.restart_as_primary().await?,
            Role::Primary => node.become_primary(None).await?,
            Role::Secondary => node.become_secondary().await?,
        }
        Ok(node)
    }

    /// A node that was primary starts again: the witness grants it a fresh epoch if it still is
    /// the primary, or tells it that it was deposed, and it then starts as secondary.
    async fn restart_as_primary(&self) -> Result<()> {
        let info = self.inner.store.volume(&self.inner.cfg.volume).await?;
        let state = ReplState::decode(&info.attr).unwrap_or_else(|| ReplState::new(Role::Primary));
        if state.epoch == Epoch(0) {
            // First start ever: the primary's first report registers it at the witness.
            return self.become_primary(None).await;
        }
        let authority = self.inner.cfg.repl.authority.clone().expect("checked by the caller");
        let req = Frame::WitnessPromote {
            pair: state.pair,
            volume: self.inner.cfg.volume.clone(),
            node: self.inner.cfg.repl.node.clone(),
            epoch: state.epoch,
            consistent: crate::state::consistent_replica(&info),
            force: false,
            reclaim: true,
        };
        let answer = authority.ask(&req, self.inner.cfg.repl.timeout).await;
        match answer {
            Ok(grant) => self.become_primary(Some(grant)).await,
            Err(e @ ReplError::Refused { .. }) => {
                tracing::warn!(volume = %self.inner.cfg.volume, "another node is primary now ({e}); starting as secondary, to be resynced from it");
                self.become_secondary().await
            }
            Err(e) => {
                // Never act as primary without the witness's word: start as secondary. If this
                // node still is the primary, its watcher asks again (a reclaim, never a takeover)
                // once the witness answers, and the witness renews its role with a fresh epoch.
                tracing::warn!(volume = %self.inner.cfg.volume, "witness unreachable ({e}); starting as secondary until it answers");
                self.become_secondary().await
            }
        }
    }

    /// Replicates with a peer at `addr` from now on (cluster mode moved the volume's other replica,
    /// or the peer's node came back on another address), without stopping: a primary drops its
    /// link and connects there, and clients' requests carry on.
    pub async fn set_peer(&self, addr: SocketAddr, name: Option<String>) -> Result<()> {
        *self.inner.peer.lock().expect("peer") = (addr, name);
        match self.primary() {
            Some(p) => p.repeer(addr).await,
            None => Ok(()),
        }
    }

    /// The primary, if this node is one now.
    pub fn primary(&self) -> Option<Primary> {
        match &*self.inner.current.lock().expect("role") {
            Current::Primary(p) => Some(p.clone()),
            _ => None,
        }
    }

    pub fn is_primary(&self) -> bool {
        self.primary().is_some()
    }

    /// The replication listener's address while this node is secondary.
    pub fn repl_addr(&self) -> Option<SocketAddr> {
        match &*self.inner.current.lock().expect("role") {
            Current::Secondary(s) => Some(s.local_addr()),
            _ => None,
        }
    }

    pub fn volume(&self) -> &str {
        &self.inner.cfg.volume
    }

    /// A watch bumped on each role change.
    pub fn role_changes(&self) -> watch::Receiver<u64> {
        self.inner.role_changes.subscribe()
    }

    pub async fn status(&self) -> NodeStatus {
        let cur = match &*self.inner.current.lock().expect("role") {
            Current::Primary(p) => Ok(p.clone()),
            Current::Secondary(s) => Err(Some(s.status())),
            Current::Stopped => Err(None),
        };
        match cur {
            Ok(p) => NodeStatus::Primary(p.status().await),
            Err(Some(s)) => NodeStatus::Secondary(s),
            Err(None) => NodeStatus::Stopped { volume: self.inner.cfg.volume.clone() },
        }
    }

    /// Takes the primary role: asks the witness for the next epoch (or, without one, takes it).
    pub async fn promote(&self, force: bool) -> Result<Epoch> {
        self.promote_as(force, false).await
    }

    /// [`Node::promote`]; with `reclaim`, only if the witness still records this node as the
    /// primary (a primary that restarted while the witness was away).
    async fn promote_as(&self, force: bool, reclaim: bool) -> Result<Epoch> {
        let _g = self.inner.changing.lock().await;
        if let Some(p) = self.primary() {
            return Ok(p.epoch());
        }
        let info = self.inner.store.volume(&self.inner.cfg.volume).await?;
        let mut state = ReplState::decode(&info.attr).unwrap_or_else(|| ReplState::new(Role::Secondary));
        let consistent = crate::state::consistent_replica(&info);
        if !consistent && !force {
            return Err(ReplError::Invalid(format!(
                "{} holds a half-applied resync and cannot be promoted",
                self.inner.cfg.volume
            )));
        }
        if state.pair == 0 && self.inner.cfg.repl.authority.is_some() {
            if !force {
                return Err(ReplError::Invalid(format!(
                    "{} has never synced with a primary, so it belongs to no pair yet; promote it with \
                     --force to start a new pair from its contents",
                    self.inner.cfg.volume
                )));
            }
            // A new pair, named now so the witness can record it.
            state.pair = crate::wire::new_origin();
            crate::state::record_state(&self.inner.store, &info, &state, syncblock_engine::StagedOp::Keep).await?;
        }
        let granted = match self.inner.cfg.repl.authority.clone() {
            Some(authority) => {
                let req = Frame::WitnessPromote {
                    pair: state.pair,
                    volume: self.inner.cfg.volume.clone(),
                    node: self.inner.cfg.repl.node.clone(),
                    epoch: state.epoch,
                    consistent,
                    force,
                    reclaim,
                };
                Some(authority.ask(&req, self.inner.cfg.repl.timeout).await?)
            }
            None => None,
        };
        tracing::warn!(volume = %self.inner.cfg.volume, ?granted, "promoting this node to primary");
        self.stop_current().await;
        self.become_primary_locked(granted).await?;
        Ok(self.primary().map_or(Epoch(0), |p| p.epoch()))
    }

    /// Steps down to secondary by the operator's decision. This resolves a split brain without a
    /// witness (both nodes primary in the same epoch: one was promoted by hand while the other was
    /// away, and the other then restarted as primary): the demoted node's writes that its peer
    /// lacks are rolled back when the peer resyncs it. Under the strict policy, which is the only
    /// one without a witness, neither node acknowledged a write alone, so nothing acknowledged is
    /// lost. Writes waiting on this node fail.
    pub async fn demote(&self) -> Result<()> {
        let _g = self.inner.changing.lock().await;
        if self.primary().is_none() {
            return Ok(());
        }
        tracing::warn!(volume = %self.inner.cfg.volume, "demoted by command: stepping down to secondary");
        self.stop_current().await;
        self.become_secondary_locked().await
    }

    /// Hands the primary role to the peer, a planned switchover (see [`Primary::hand_over`]), and
    /// returns once this node has stepped down to secondary, with the authority's grant to the
    /// peer. The peer takes the role at its next request to the authority, which it makes as soon
    /// as this node's link to it closes, and then resyncs this node (nothing differs).
    pub async fn switchover(&self) -> Result<Grant> {
        let volume = &self.inner.cfg.volume;
        let Some(p) = self.primary() else {
            return Err(ReplError::Invalid(format!(
                "this node is not the primary of {volume}: run the switchover on its primary"
            )));
        };
        let Some(to) = self.inner.peer.lock().expect("peer").1.clone() else {
            return Err(ReplError::Invalid(format!(
                "the peer of {volume} has no configured node name (--peer-node): the witness must be told which \
                 node takes over"
            )));
        };
        let grant = p.hand_over(&to).await?;
        let mut roles = self.role_changes();
        let stepped_down = roles.wait_for(|_| !self.primary().is_some_and(|cur| cur.same(&p)));
        if tokio::time::timeout(self.inner.cfg.repl.timeout * 10, stepped_down).await.is_err() {
            tracing::warn!(volume = %volume, "switchover granted, but this node has not stepped down yet");
        }
        Ok(grant)
    }

    /// Compares both replicas (see [`Primary::verify`]); only on the primary.
    pub async fn verify(&self, repair: bool) -> Result<crate::primary::VerifyReport> {
        match self.primary() {
            Some(p) => p.verify(repair).await,
            None => Err(ReplError::Invalid(format!(
                "this node is not the primary of {}: run verify on the primary",
                self.inner.cfg.volume
            ))),
        }
    }

    /// When this node last became primary.
    pub fn promoted_at(&self) -> Option<Instant> {
        *self.inner.promoted_at.lock().expect("promoted")
    }

    pub async fn stop(&self) {
        let _ = self.inner.stop.send(true);
        let _g = self.inner.changing.lock().await;
        self.stop_current().await;
    }

    async fn stop_current(&self) {
        let cur = std::mem::replace(&mut *self.inner.current.lock().expect("role"), Current::Stopped);
        match cur {
            Current::Primary(p) => p.stop(),
            Current::Secondary(s) => s.stop().await,
            Current::Stopped => {}
        }
    }

    async fn become_primary(&self, granted: Option<Grant>) -> Result<()> {
        let _g = self.inner.changing.lock().await;
        self.become_primary_locked(granted).await
    }

    // Boxed: role changes start tasks that change roles again, and the compiler needs the cycle
    // of futures broken by a named, `Send` type.
    fn become_primary_locked(&self, granted: Option<Grant>) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.become_primary_inner(granted))
    }

    async fn become_primary_inner(&self, granted: Option<Grant>) -> Result<()> {
        let c = &self.inner.cfg;
        let (peer, peer_node) = self.inner.peer.lock().expect("peer").clone();
        let repl = ReplConfig { peer_node: peer_node.clone(), ..c.repl.clone() };
        let p = Primary::start(self.inner.store.clone(), &c.volume, peer, repl, granted).await?;
        // A primary keeps its replication port open: a newer primary that reaches it there (when
        // the witness cannot) tells it that it was deposed.
        match c.repl.net.bind(c.repl_listen).await {
            Ok(l) => {
                tokio::spawn(listen_for_successor(l, p.clone(), c.repl.timeout, peer_node));
            }
            Err(e) => tracing::debug!(volume = %c.volume, "primary cannot listen on {}: {e}", c.repl_listen),
        }
        *self.inner.current.lock().expect("role") = Current::Primary(p.clone());
        *self.inner.promoted_at.lock().expect("promoted") = Some(Instant::now());
        self.inner.role_changes.send_modify(|n| *n += 1);
        // Step down when deposed.
        let node = self.clone();
        tokio::spawn(async move {
            let why = tokio::select! {
                biased;
                why = p.deposed() => why,
                _ = wait_stop(&node.inner.stop) => return,
            };
            tracing::warn!(volume = %node.inner.cfg.volume, "stepping down to secondary: {why}");
            let _g = node.inner.changing.lock().await;
            if node.primary().is_some_and(|cur| cur.same(&p)) {
                node.stop_current().await;
                if let Some(epoch) = p.handed_over() {
                    if let Err(e) = node.record_seen(epoch).await {
                        tracing::error!(volume = %node.inner.cfg.volume, "cannot record epoch {epoch} as seen: {e}");
                    }
                }
                if let Err(e) = node.become_secondary_locked().await {
                    tracing::error!(volume = %node.inner.cfg.volume, "cannot become secondary: {e}");
                }
            }
        });
        Ok(())
    }

    /// Records `epoch` as seen by this replica, as a secondary that accepted a primary of it would
    /// (see [`Primary::handed_over`]).
    async fn record_seen(&self, epoch: Epoch) -> Result<()> {
        let info = self.inner.store.volume(&self.inner.cfg.volume).await?;
        // A primary's state always decodes; were it not to, nothing is written over it here.
        let Some(mut state) = ReplState::decode(&info.attr) else { return Ok(()) };
        if state.epoch >= epoch {
            return Ok(());
        }
        state.epoch = epoch;
        state.role = Role::Secondary;
        crate::state::record_state(&self.inner.store, &info, &state, syncblock_engine::StagedOp::Keep).await?;
        tracing::info!(volume = %self.inner.cfg.volume, epoch = epoch.0, "recorded the switchover's epoch as seen");
        Ok(())
    }

    async fn become_secondary(&self) -> Result<()> {
        let _g = self.inner.changing.lock().await;
        self.become_secondary_locked().await
    }

    fn become_secondary_locked(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.become_secondary_inner())
    }

    async fn become_secondary_inner(&self) -> Result<()> {
        let c = &self.inner.cfg;
        let listener = bind_retrying(c.repl.net.as_ref(), c.repl_listen).await?;
        let peer_node = self.inner.peer.lock().expect("peer").1.clone();
        let repl = ReplConfig { peer_node, ..c.repl.clone() };
        let s = Secondary::start(self.inner.store.clone(), &c.volume, listener, repl).await?;
        *self.inner.current.lock().expect("role") = Current::Secondary(s.clone());
        self.inner.role_changes.send_modify(|n| *n += 1);
        if c.repl.authority.is_some() {
            tokio::spawn(watch_primary(self.clone(), s));
        }
        Ok(())
    }
}

async fn wait_stop(stop: &watch::Sender<bool>) {
    let mut rx = stop.subscribe();
    let _ = rx.wait_for(|s| *s).await;
}

/// The replication port may still be held for a moment by the previous role's listener.
async fn bind_retrying(net: &dyn crate::net::Net, addr: SocketAddr) -> Result<crate::net::BoxListener> {
    let mut last = None;
    for _ in 0..50 {
        match net.bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last.expect("tried").into())
}

/// While this node is primary, answers connections on its replication port: a `Hello` of this
/// pair from a newer epoch means another node was promoted, and this one is deposed (it then steps
/// down and the newcomer resyncs it). Anything else is refused. Ends when the primary stops or is
/// deposed. Each connection is handled on its own task, at most `SUCCESSOR_HANDSHAKES` at once, so
/// a silent or slow client cannot keep a successor out.
async fn listen_for_successor(
    mut listener: crate::net::BoxListener,
    p: Primary,
    timeout: Duration,
    peer_node: Option<String>,
) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(SUCCESSOR_HANDSHAKES));
    loop {
        let accepted = tokio::select! {
            biased;
            _ = p.stopped() => return,
            a = listener.accept() => a,
        };
        let Ok(incoming) = accepted else { return };
        let from = incoming.from;
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            tracing::warn!(%from, "replication port: {SUCCESSOR_HANDSHAKES} handshakes in progress; dropping one more");
            continue;
        };
        let (p, peer_node) = (p.clone(), peer_node.clone());
        tokio::spawn(async move {
            match incoming.establish().await {
                Ok(peer) => answer_successor(peer, &p, timeout, peer_node).await,
                Err(e) => tracing::warn!(%from, "replication port: TLS handshake failed: {e}; connection dropped"),
            }
            drop(permit);
        });
    }
}

/// Connections answered at once on a primary's replication port (a successor's hello, probes).
const SUCCESSOR_HANDSHAKES: usize = 8;

async fn answer_successor(peer: crate::net::Peer, p: &Primary, timeout: Duration, peer_node: Option<String>) {
    let (from, who) = (peer.who.from, peer.who);
    let (mut rd, mut wr) = crate::net::split(peer.stream);
    let refuse = |why: Refusal, reason: String| Frame::Refuse { why, reason };
    let frame = rd.read_frame(timeout).await;
    let named = match &frame {
        Ok(Frame::Hello { node, .. }) => who.check_peer(node, peer_node.as_deref()),
        _ => Ok(()),
    };
    let answer = match frame {
        Ok(Frame::Hello { .. }) if named.is_err() => {
            let reason = named.expect_err("checked");
            tracing::warn!(%from, "replication port: {reason}");
            refuse(Refusal::Protocol, reason)
        }
        Ok(Frame::Hello { pair, node, .. }) if pair != p.pair() => {
            tracing::warn!(%from, "refusing {node}: it belongs to pair {pair:016x}, this node to {:016x}", p.pair());
            refuse(Refusal::WrongPair, format!("this node belongs to pair {:016x}, not {pair:016x}", p.pair()))
        }
        Ok(Frame::Hello { epoch, node, .. }) if epoch > p.epoch() => {
            let why = format!("{node} (at {from}) is primary in epoch {epoch}; this node's epoch is {}", p.epoch());
            tracing::error!("deposed: {why}");
            p.depose(why);
            refuse(Refusal::SteppingDown, "stepping down; retry".into())
        }
        Ok(Frame::Hello { epoch, .. }) if epoch < p.epoch() => refuse(
            Refusal::Deposed { epoch: p.epoch() },
            format!("stale epoch {epoch}: this node is primary in epoch {}", p.epoch()),
        ),
        Ok(Frame::Hello { epoch, node, .. }) => {
            // The same epoch, taken by both nodes on their own: only without a witness (one
            // was promoted by hand while the other was away). Neither can tell which is newer.
            let reason = format!(
                "split brain: {node} and this node are both primary in epoch {epoch} (one was promoted \
                 by hand while the other was away); run `syncblock demote` on the node whose writes \
                 since then are to be discarded"
            );
            tracing::error!("{reason}");
            refuse(Refusal::SplitBrain { epoch }, reason)
        }
        Ok(other) => {
            tracing::warn!(%from, "replication port: unexpected {other:?}; this node is primary");
            refuse(Refusal::Protocol, format!("this node is primary in epoch {}", p.epoch()))
        }
        Err(e) => {
            tracing::warn!(%from, "replication port: not a syncblock peer ({e}); connection dropped");
            return;
        }
    };
    let _ = crate::link::write_frame(&mut wr, &answer).await;
}

/// While this node is secondary and its primary is gone (its link was lost), ask the witness to
/// promote it until it is promoted or the primary comes back. The witness decides whether the
/// primary is really gone; when it says the primary reported too recently, it says when to ask
/// again, so the takeover happens as soon as its window has passed.
///
/// Without automatic failover the watcher only *reclaims*: it asks to be primary only if the
/// witness still records this node as the primary (a primary that restarted while the witness
/// was unreachable started as secondary, and takes its role back once the witness answers).
async fn watch_primary(node: Node, sec: Secondary) {
    let timeout = node.inner.cfg.repl.timeout;
    let mut status = sec.watch();
    let mut stop = node.inner.stop.subscribe();
    let mut next_ask = Instant::now();
    let mut last_refusal = String::new();
    loop {
        // A primary that was connected and is gone is asked about at once, whatever an earlier
        // refusal said to wait: after a switchover to this node, the old primary's link closing
        // is the sign that this node is now the recorded primary, and the role should be taken
        // without delay (the old primary, one epoch behind the grant, cannot take it meanwhile).
        if status.borrow().connected {
            next_ask = Instant::now();
        }
        let wake = if status.borrow().connected { Instant::now() + timeout / 4 } else { next_ask };
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return,
            r = status.changed() => if r.is_err() { return },
            _ = tokio::time::sleep_until(wake) => {}
        }
        // This secondary was replaced (promoted, or stopped): its watcher ends.
        let still_current = matches!(&*node.inner.current.lock().expect("role"), Current::Secondary(s) if s.same(&sec));
        if !still_current {
            return;
        }
        if status.borrow().connected || Instant::now() < next_ask {
            continue;
        }
        // Without automatic failover, the watcher only reclaims this node's own role.
        let reclaim = !node.inner.cfg.auto_failover;
        match node.promote_as(false, reclaim).await {
            Ok(epoch) => {
                if reclaim {
                    tracing::warn!(volume = %node.inner.cfg.volume, epoch = epoch.0, "the witness renewed this node's primary role");
                } else {
                    tracing::warn!(volume = %node.inner.cfg.volume, epoch = epoch.0, "automatic failover: this node is now primary");
                }
                return;
            }
            Err(e) => {
                let msg = e.to_string();
                if msg != last_refusal {
                    tracing::info!(volume = %node.inner.cfg.volume, "not taking over: {msg}");
                    last_refusal = msg;
                }
                next_ask = Instant::now()
                    + match e.refusal() {
                        Some(Refusal::PrimaryAlive { retry_after_ms }) => {
                            Duration::from_millis(retry_after_ms).clamp(ASK_AGAIN_MIN, timeout)
                        }
                        _ => timeout / 2,
                    };
            }
        }
    }
}

/// The shortest pause before asking the witness again when it named a time: enough to keep a
/// clock mismatch from turning into a burst of requests.
const ASK_AGAIN_MIN: Duration = Duration::from_millis(10);
