//! One node's membership: it registers (`members/NAME`, and `alive/NAME` under a lease it keeps
//! alive), watches the cluster, and runs a replicator [`Node`] for every volume it holds a
//! replica of, stopping and deleting the ones it no longer holds. The NBD server asks it which
//! volumes this node serves, and where the others are served.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, WatchOptions};
use syncblock_engine::Store;
use tokio::sync::watch;
use tokio::time::Instant;

use super::authority::{Etcd, Standing};
use super::mux::MuxNet;
use super::router::{RoutedNet, Router};
use super::{Cluster, ClusterError, MemberInfo, Snapshot, VolumeSpec};
use crate::net::BoxListener;
use crate::state::{ReplState, Role};
use crate::{Node, NodeConfig, Policy, ReplConfig};

/// The lease TTL asked of etcd by default: 1 s. A dead node's volumes fail over about a TTL after
/// its last keep-alive (plus etcd's expiry check, every 500 ms), so this sets the failover time.
/// etcd raises a shorter TTL to its minimum, 1.5 election timeouts rounded up (2 s with etcd's
/// defaults; 1 s with `--election-timeout 500 --heartbeat-interval 50`, which docs/cluster.md uses).
pub const DEFAULT_TTL: Duration = Duration::from_secs(1);

/// How long a node may be gone before the volumes it held are given a new replica elsewhere
/// (re-protection, a full copy): 10 minutes, as Ceph and Vitastor default to, so a reboot or a
/// short network outage costs an incremental resync when the node returns, not a full copy.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(600);

/// What a node needs to join.
#[derive(Clone)]
pub struct MemberConfig {
    pub info: MemberInfo,
    /// The lease TTL to ask for (etcd may grant more).
    pub ttl: Duration,
    /// Replication settings shared by every volume (network with or without TLS, timeouts).
    pub repl: ReplConfig,
    /// How long a peer node may be dead before this node, as primary, moves the volume's other
    /// replica elsewhere ([`DEFAULT_GRACE`]).
    pub grace: Duration,
}

struct Running {
    node: Node,
    id: u64,
    /// The volume's size when it started: a record that grew restarts it (see `reconcile`).
    size: u64,
    /// The node it replicates with, and that node's replication address when this one started.
    peer: String,
    peer_addr: std::net::SocketAddr,
}

struct Inner {
    store: Store,
    cluster: Cluster,
    cfg: MemberConfig,
    router: Arc<Router>,
    /// Outgoing replication: one link per peer node for all the volumes this node is primary of.
    links: Arc<MuxNet>,
    authority: Arc<Etcd>,
    standing: watch::Receiver<Standing>,
    running: tokio::sync::Mutex<BTreeMap<String, Running>>,
    /// The volumes' nodes, for the NBD server (read without waiting on `running`).
    nodes: std::sync::Mutex<BTreeMap<String, Node>>,
    snapshot: watch::Sender<Arc<Snapshot>>,
    /// Bumped as soon as the watch sees a node's `alive/` key deleted (before the 50 ms gathering
    /// of a reconcile): requests held because a primary is alive decide again at once.
    alive_gone: watch::Sender<u64>,
    stop: watch::Sender<bool>,
    /// Since when (by this node's clock) each member has been seen dead.
    dead_since: std::sync::Mutex<BTreeMap<String, Instant>>,
    /// Set after each reconcile: the re-protector looks again.
    reprotect_due: tokio::sync::Notify,
    /// Local volumes the cluster does not know, warned about once.
    unknown_warned: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

/// A node's membership in the cluster. Cheap to clone.
#[derive(Clone)]
pub struct Member {
    inner: Arc<Inner>,
}

impl Member {
    /// Registers this node and starts serving its share of the cluster. `repl_listener` is the
    /// node's one replication listener (TLS-wrapped when the node has credentials).
    pub async fn join(
        store: Store,
        cluster: Cluster,
        cfg: MemberConfig,
        repl_listener: BoxListener,
    ) -> Result<Member, ClusterError> {
        super::check_name("node", &cfg.info.name)?;
        let router = Router::start(repl_listener, cfg.info.name.clone())
            .map_err(|e| ClusterError::Refused(format!("replication listener: {e}")))?;
        let (standing_tx, standing) = register(&cluster, &cfg).await?;
        let (alive_gone, alive_gone_rx) = watch::channel(0u64);
        let authority = Arc::new(Etcd::new(cluster.clone(), cfg.info.name.clone(), standing.clone(), alive_gone_rx));
        let member = Member {
            inner: Arc::new(Inner {
                store,
                cluster,
                links: MuxNet::over(cfg.repl.net.clone()),
                cfg,
                router,
                authority,
                standing,
                running: tokio::sync::Mutex::new(BTreeMap::new()),
                nodes: std::sync::Mutex::new(BTreeMap::new()),
                snapshot: watch::channel(Arc::new(Snapshot::default())).0,
                alive_gone,
                stop: watch::channel(false).0,
                dead_since: std::sync::Mutex::new(BTreeMap::new()),
                reprotect_due: tokio::sync::Notify::new(),
                unknown_warned: Default::default(),
            }),
        };
        // The lease is kept on a thread of its own, with its own connection to etcd: a node busy
        // copying a volume (or serving clients) on its runtime's workers must not miss its
        // keep-alives, which would end its solo grants (writes then wait for a peer still being
        // copied) and, past the TTL, fail its volumes over.
        let lease_cluster = member.inner.cluster.separate().await?;
        let (cfg, stop) = (member.inner.cfg.clone(), member.inner.stop.subscribe());
        std::thread::Builder::new()
            .name("etcd-lease".into())
            .spawn(move || match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt.block_on(keep_alive(lease_cluster, cfg, stop, standing_tx)),
                Err(e) => tracing::error!("cannot start the lease thread's runtime: {e}"),
            })
            .map_err(|e| ClusterError::Refused(format!("starting the lease thread: {e}")))?;
        let first = member.inner.cluster.snapshot().await?;
        member.reconcile(first).await;
        tokio::spawn(watch_cluster(member.clone()));
        tokio::spawn(reprotector(member.clone()));
        Ok(member)
    }

    pub fn name(&self) -> &str {
        &self.inner.cfg.info.name
    }

    /// The replicator node of `volume`, if this node holds a replica of it.
    pub fn node(&self, volume: &str) -> Option<Node> {
        self.inner.nodes.lock().expect("nodes").get(volume).cloned()
    }

    /// Every volume this node holds a replica of, with its replicator node.
    pub fn nodes(&self) -> BTreeMap<String, Node> {
        self.inner.nodes.lock().expect("nodes").clone()
    }

    /// The cluster as last read.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.snapshot.borrow().clone()
    }

    /// Why this node does not serve `export`, naming the node that does, if another does (or
    /// none can now). `None`: this node serves it, or no such volume exists.
    pub fn served_elsewhere(&self, export: &str) -> Option<String> {
        if self.node(export).is_some_and(|n| n.is_primary()) {
            return None;
        }
        let snap = self.snapshot();
        let v = snap.volumes.get(export)?;
        let primary = snap.primary_of(v);
        let me = self.name();
        Some(match snap.members.get(primary) {
            Some(m) if snap.alive.contains_key(primary) && primary != me => {
                format!("volume {export:?} is served by node {primary} at {}/{export}", m.uri())
            }
            _ if primary == me => {
                format!("volume {export:?}: node {me} is becoming its primary; try again in a moment")
            }
            _ => format!("volume {export:?}: its primary {primary} is down and no node serves it yet; try again"),
        })
    }

    /// Stops every volume's replicator node and deregisters (revoking the lease, so that the
    /// volumes this node was primary of fail over at once rather than after a TTL).
    pub async fn stop(&self) {
        let _ = self.inner.stop.send(true);
        let running = std::mem::take(&mut *self.inner.running.lock().await);
        for (name, r) in running {
            r.node.stop().await;
            self.inner.router.forget(&name);
        }
        self.inner.nodes.lock().expect("nodes").clear();
        let lease = self.inner.standing.borrow().lease;
        let _ = self.inner.cluster.client().lease_client().revoke(lease).await;
    }

    /// Starts the volumes placed here that are not running, and stops (and deletes) the ones that
    /// are no longer placed here.
    async fn reconcile(&self, snap: Snapshot) {
        let snap = Arc::new(snap);
        self.inner.snapshot.send_replace(snap.clone());
        if *self.inner.stop.borrow() {
            return;
        }
        let me = self.name().to_string();
        let now = Instant::now();
        {
            let mut dead = self.inner.dead_since.lock().expect("dead");
            dead.retain(|n, _| !snap.alive.contains_key(n));
            for n in snap.members.keys().filter(|n| !snap.alive.contains_key(*n)) {
                dead.entry(n.clone()).or_insert(now);
            }
        }
        let mine: BTreeMap<&String, &VolumeSpec> =
            snap.volumes.iter().filter(|(_, v)| v.replicas.contains(&me)).collect();
        let mut running = self.inner.running.lock().await;
        // Re-protected (the same volume with another peer), or the peer came back on another
        // address: the volume's node replicates there from now on, without stopping (its clients'
        // requests carry on).
        for (name, r) in running.iter_mut() {
            let Some(v) = mine.get(name).filter(|v| v.id == r.id) else { continue };
            let Some(peer) = v.replicas.iter().find(|p| **p != me) else { continue };
            let Some(addr) = snap.members.get(peer).map(|m| m.repl) else { continue };
            if *peer == r.peer && addr == r.peer_addr {
                continue;
            }
            tracing::info!(volume = %name, old = %r.peer, new = %peer, %addr, "the volume's other replica moved");
            match r.node.set_peer(addr, Some(peer.clone())).await {
                Ok(()) => {
                    r.peer = peer.clone();
                    r.peer_addr = addr;
                }
                Err(e) => tracing::warn!(volume = %name, "moving to the new peer: {e}"),
            }
        }
        // Grown (`volume resize`): the replica stops, and starts again below at the new size (its
        // copy grown first), so that both nodes agree on the size in their handshake. Its clients
        // reconnect, as after a switchover.
        let grown: Vec<String> = running
            .iter()
            .filter(|(name, r)| mine.get(name).is_some_and(|v| v.id == r.id && v.size != r.size))
            .map(|(n, _)| n.clone())
            .collect();
        for name in grown {
            let old = running[&name].size;
            tracing::info!(volume = %name, old, new = mine[&name].size, "the volume was resized: restarting its replica");
            self.stop_replica(&mut running, &name).await;
        }
        let gone: Vec<String> = running
            .iter()
            .filter(|(name, r)| mine.get(name).is_none_or(|v| v.id != r.id))
            .map(|(n, _)| n.clone())
            .collect();
        for name in gone {
            self.stop_replica(&mut running, &name).await;
            self.inner.router.forget(&name);
            if let Err(e) = self.delete_local(&name).await {
                tracing::warn!(volume = %name, "removing this node's replica: {e}");
            } else {
                tracing::info!(volume = %name, "volume deleted or moved away: this node's replica removed");
            }
        }
        // Copies left from before this node went away: a volume now held by other nodes (it was
        // re-protected while this node was gone) is removed; one the cluster does not know is
        // kept, with a warning, because an etcd that lost its data, or the wrong --etcd, must
        // never make a node delete what it holds.
        if let Ok(local) = self.inner.store.list_volumes().await {
            for v in local.iter().filter(|v| !running.contains_key(&v.name) && !mine.contains_key(&v.name)) {
                match snap.volumes.get(&v.name) {
                    Some(spec) => match self.inner.store.delete_volume(v.id).await {
                        Ok(()) => tracing::info!(
                            volume = %v.name,
                            holders = %spec.replicas.join(","),
                            "the volume moved to other nodes while this one was away: this node's replica removed"
                        ),
                        Err(e) => tracing::warn!(volume = %v.name, "removing a stale replica: {e}"),
                    },
                    None => {
                        if self.inner.unknown_warned.lock().expect("warned").insert(v.name.clone()) {
                            tracing::warn!(
                                volume = %v.name,
                                "this store holds a volume the cluster does not know (deleted while this node was \
                                 away, or the wrong --etcd?); keeping it: delete it by hand once sure"
                            );
                        }
                    }
                }
            }
        }
        for (name, spec) in mine {
            if running.contains_key(name) {
                continue;
            }
            match self.start_volume(&snap, spec).await {
                Ok((node, peer, peer_addr)) => {
                    self.inner.nodes.lock().expect("nodes").insert(name.clone(), node.clone());
                    running.insert(name.clone(), Running { node, id: spec.id, size: spec.size, peer, peer_addr });
                }
                Err(e) => tracing::warn!(volume = %name, "cannot start this node's replica yet: {e}"),
            }
        }
        drop(running);
        self.inner.reprotect_due.notify_one();
    }

    /// The volumes this node is the granted primary of whose other replica's node has been dead
    /// longer than the grace period (or was removed), with that node.
    fn overdue(&self, snap: &Snapshot) -> Vec<(String, String)> {
        let dead = self.inner.dead_since.lock().expect("dead");
        super::plan::overdue(snap, self.name(), &dead, Instant::now(), self.inner.cfg.grace)
    }

    /// Whether this node's replica of `name` runs as primary connected to its peer. Such a volume
    /// is not moved even if its peer's node is "lost": that node is only cut off from etcd, and
    /// its replica is current. Moving it would copy the volume again for nothing, and an in-sync
    /// report in flight could clear the solo mark the move sets (found by the control-plane
    /// simulation).
    fn connected(&self, name: &str) -> bool {
        self.node(name).and_then(|n| n.primary()).is_some_and(|p| p.peer_view().borrow().connected)
    }

    /// Stops the running replica `name` and stops offering it to the NBD server.
    async fn stop_replica(&self, running: &mut BTreeMap<String, Running>, name: &str) {
        let r = running.remove(name).expect("running");
        self.inner.nodes.lock().expect("nodes").remove(name);
        r.node.stop().await;
    }

    async fn delete_local(&self, name: &str) -> syncblock_engine::Result<()> {
        match self.inner.store.volume(name).await {
            Ok(info) => self.inner.store.delete_volume(info.id).await,
            Err(_) => Ok(()),
        }
    }

    /// Creates this node's replica of `spec` if it has none (or only one of a deleted volume of the
    /// same name) and starts its replicator node.
    async fn start_volume(
        &self,
        snap: &Snapshot,
        spec: &VolumeSpec,
    ) -> crate::Result<(Node, String, std::net::SocketAddr)> {
        let me = self.name();
        let store = &self.inner.store;
        let Some(peer_name) = spec.replicas.iter().find(|r| *r != me) else {
            return Err(crate::ReplError::Invalid(format!("{} has no replica on another node", spec.name)));
        };
        let Some(peer) = snap.members.get(peer_name) else {
            return Err(crate::ReplError::Invalid(format!("{peer_name} (its peer) has never joined")));
        };
        let first_role = if spec.replicas.first().is_some_and(|f| f == me) { Role::Primary } else { Role::Secondary };
        let existing = store.volume(&spec.name).await.ok();
        let stale =
            existing.as_ref().is_some_and(|info| ReplState::decode(&info.attr).is_some_and(|s| s.pair != spec.id));
        if stale {
            tracing::warn!(volume = %spec.name, "this node's replica belongs to a deleted volume of the same name; replacing it");
            self.delete_local(&spec.name).await?;
        }
        let mut info = match existing {
            Some(info) if !stale => info,
            _ => store.create_volume(&spec.name, spec.size).await?,
        };
        // The volume grew (while this replica ran, or while this node was away).
        if info.size_bytes < spec.size {
            store.resize_volume(info.id, spec.size).await?;
            info = store.volume(&spec.name).await?;
        }
        // The volume's pair id comes from the cluster, never drawn by its first primary: a replica
        // whose state could not be recorded (the store's bound on replicated volumes) gets it on
        // the next try instead of a primary role under an id of its own.
        if ReplState::decode(&info.attr).is_none() {
            let mut state = ReplState::new(first_role);
            state.pair = spec.id;
            crate::state::record_state(store, &info, &state, syncblock_engine::StagedOp::Keep).await?;
        }
        let base = &self.inner.cfg.repl;
        let ncfg = NodeConfig {
            volume: spec.name.clone(),
            repl_listen: self.inner.router.local_addr(),
            peer: peer.repl,
            auto_failover: true,
            repl: ReplConfig {
                net: Arc::new(RoutedNet {
                    inner: self.inner.links.clone(),
                    router: self.inner.router.clone(),
                    volume: spec.name.clone(),
                }),
                authority: Some(self.inner.authority.clone()),
                policy: Policy::Degrade,
                peer_node: Some(peer_name.clone()),
                ..base.clone()
            },
        };
        tracing::info!(volume = %spec.name, peer = %peer_name, "starting this node's replica");
        Ok((Node::start(store.clone(), ncfg, first_role).await?, peer_name.clone(), peer.repl))
    }
}

/// Registers `cfg.info` under a new lease: waits out a previous run's lease of the same name (a
/// node restarting after a crash) for up to three TTLs, and refuses a name another live node holds.
async fn register(
    cluster: &Cluster,
    cfg: &MemberConfig,
) -> Result<(watch::Sender<Standing>, watch::Receiver<Standing>), ClusterError> {
    let name = &cfg.info.name;
    let mut client = cluster.client();
    let ttl_secs = cfg.ttl.as_secs_f64().ceil().max(1.0) as i64;
    let alive_key = cluster.key(&format!("alive/{name}"));
    let member_key = cluster.key(&format!("members/{name}"));
    let deadline = Instant::now() + cfg.ttl.max(Duration::from_secs(2)) * 3;
    loop {
        let sent = Instant::now();
        let granted = client.lease_grant(ttl_secs, None).await.map_err(|e| cluster.err(e))?;
        let ttl = Duration::from_secs(granted.ttl().max(1) as u64);
        let value = serde_json::to_vec(&cfg.info).expect("serialisable");
        // A node an operator removed joins again as new: its removal mark goes (its replicas that
        // were moved meanwhile are stale, and reconcile removes them).
        let txn = Txn::new().when(vec![Compare::version(alive_key.clone(), CompareOp::Equal, 0)]).and_then(vec![
            TxnOp::put(member_key.clone(), value, None),
            TxnOp::put(alive_key.clone(), b"1".to_vec(), Some(PutOptions::new().with_lease(granted.id()))),
            TxnOp::delete(cluster.key(&format!("removed/{name}")), None),
        ]);
        let resp = client.txn(txn).await.map_err(|e| cluster.err(e))?;
        if resp.succeeded() {
            if granted.ttl() > ttl_secs {
                tracing::info!(
                    "etcd granted a {}s lease (its minimum; asked {ttl_secs}s): failover takes about that long; \
                     see docs/cluster.md for etcd settings that allow 1 s",
                    granted.ttl()
                );
            }
            tracing::info!(node = %name, lease = format!("{:x}", granted.id()), ?ttl, "joined the cluster");
            let standing =
                Standing { lease: granted.id(), valid_until: Some(sent + ttl * 2 / 3), grant_lease: ttl * 2 / 3 };
            return Ok(watch::channel(standing));
        }
        let _ = client.lease_revoke(granted.id()).await;
        if Instant::now() >= deadline {
            return Err(ClusterError::Refused(format!(
                "a node named {name} is alive in the cluster (its alive key stayed for {:?}); two nodes cannot share a name",
                deadline.saturating_duration_since(sent) + cfg.ttl * 3
            )));
        }
        tracing::info!(node = %name, "a previous run of this node still holds its lease; waiting for it to expire");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Keeps the lease alive: a keep-alive every third of the TTL; each one etcd answers extends this
/// node's standing to two thirds of the TTL after it was sent. A lease etcd has expired (the node
/// was cut off longer than its TTL) is replaced by a new registration; the volumes it was primary
/// of may have failed over meanwhile, which their replicator nodes learn from the grants.
///
/// A keep-alive unanswered for a sixth of the TTL (`answer_wait`) makes the node connect again
/// to the members that answer. The member it used may hang with its connections open (stopped,
/// or cut off without a reset), and the lease must be renewed through another before it runs
/// out: the longest a hung member keeps the lease unrenewed is then a third of the TTL until the
/// next keep-alive, a sixth waiting for its answer, and a reconnection (the members' status, at
/// most [`super::PROBE_GRACE`] after the first answers): about 0.65 s of a 1 s TTL.
async fn keep_alive(
    cluster: Cluster,
    cfg: MemberConfig,
    mut stop: watch::Receiver<bool>,
    standing: watch::Sender<Standing>,
) {
    let mut outage = Outage::default();
    loop {
        if *stop.borrow() {
            return;
        }
        let mut client = cluster.client();
        let lease = standing.borrow().lease;
        let grant_lease = standing.borrow().grant_lease;
        let period = (grant_lease / 2).max(Duration::from_millis(100));
        let answer_wait = period / 2;
        // Opening the stream sends a first keep-alive and waits for its answer: bounded like the
        // others, since a member that hangs (stopped, or cut off without a reset) never answers.
        let opened = tokio::select! {
            r = tokio::time::timeout(answer_wait, client.lease_keep_alive(lease)) => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        let (mut keeper, mut answers) = match opened {
            Ok(Ok(x)) => x,
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(m))) if m == "lease not found" => {
                // etcd has expired the lease (its answer was a TTL of 0).
                reregister(&cluster, &cfg, &standing).await;
                continue;
            }
            other => {
                match other {
                    Ok(Err(e)) => outage.warn(format_args!("etcd keep-alive: {}; reconnecting", cluster.err(e))),
                    _ => outage.warn(format_args!("etcd keep-alive went unanswered; reconnecting")),
                }
                if !outage.reconnect(&cluster).await {
                    tokio::select! { _ = tokio::time::sleep(period / 2) => {}, _ = stop.wait_for(|s| *s) => return }
                }
                continue;
            }
        };
        loop {
            let sent = Instant::now();
            let answered = async {
                keeper.keep_alive().await?;
                answers.message().await
            };
            let r = tokio::select! {
                r = tokio::time::timeout(answer_wait, answered) => r,
                _ = stop.wait_for(|s| *s) => return,
            };
            match r {
                Ok(Ok(Some(a))) if a.ttl() > 0 => {
                    outage.over("etcd keep-alives");
                    let ttl = Duration::from_secs(a.ttl() as u64);
                    standing.send_modify(|s| {
                        s.valid_until = Some(sent + ttl * 2 / 3);
                        s.grant_lease = ttl * 2 / 3;
                    });
                }
                Ok(Ok(Some(_))) => {
                    reregister(&cluster, &cfg, &standing).await;
                    break;
                }
                Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                    outage.warn(format_args!("etcd keep-alive went unanswered; reconnecting"));
                    outage.reconnect(&cluster).await;
                    break;
                }
            }
            let next = sent + period;
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }
}

/// etcd expired this node's lease: the node registers again under a new one (its standing lapses
/// meanwhile, so it grants itself nothing).
async fn reregister(cluster: &Cluster, cfg: &MemberConfig, standing: &watch::Sender<Standing>) {
    tracing::error!("etcd expired this node's lease (cut off from etcd longer than its TTL); registering again");
    standing.send_modify(|s| s.valid_until = None);
    match register(cluster, cfg).await {
        Ok((_, rx)) => {
            let fresh = *rx.borrow();
            standing.send_replace(fresh);
        }
        Err(e) => {
            tracing::error!("registering again: {e}");
            // Not at once again: etcd may be refusing connections.
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// Follows the cluster: applies each change under the prefix that the watch reports to this node's
/// copy of the cluster, gathering what arrives within 50 ms of a change into one reconcile, so a
/// burst of changes costs one. The whole prefix is read again only when the watch breaks (etcd
/// restarted, a member was lost, the revision to resume from was compacted) or a record does not
/// decode.
async fn watch_cluster(member: Member) {
    let inner = &member.inner;
    let mut stop = inner.stop.subscribe();
    let mut snap: Snapshot = (*inner.snapshot.borrow().clone()).clone();
    let mut outage = Outage::default();
    loop {
        if *stop.borrow() {
            return;
        }
        let mut client = inner.cluster.client();
        let opts = WatchOptions::new().with_prefix().with_start_revision(snap.revision + 1);
        let mut stream = match client.watch(inner.cluster.key(""), Some(opts)).await {
            Ok(s) => {
                outage.over("the etcd watch");
                s
            }
            Err(e) => {
                outage.warn(format_args!("etcd watch: {}; reconnecting", inner.cluster.err(e)));
                outage.reconnect(&inner.cluster).await;
                tokio::select! { _ = tokio::time::sleep(Duration::from_millis(500)) => continue, _ = stop.wait_for(|s| *s) => return }
            }
        };
        'watching: loop {
            let msg = tokio::select! {
                m = stream.message() => m,
                _ = stop.wait_for(|s| *s) => return,
            };
            let mut broken = false;
            match msg {
                Ok(Some(resp)) if !resp.canceled() && resp.events().is_empty() => continue,
                Ok(Some(resp)) if !resp.canceled() => broken |= !applied(inner, &mut snap, &resp),
                _ => break 'watching,
            }
            // What else arrives within 50 ms joins this reconcile.
            let gather = tokio::time::sleep(Duration::from_millis(50));
            tokio::pin!(gather);
            while !broken {
                tokio::select! {
                    m = stream.message() => match m {
                        Ok(Some(resp)) if !resp.canceled() => broken |= !applied(inner, &mut snap, &resp),
                        _ => broken = true,
                    },
                    _ = &mut gather => break,
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
            if broken {
                break 'watching;
            }
            member.reconcile(snap.clone()).await;
        }
        // The watch ended, or a change could not be applied: read everything again.
        tokio::time::sleep(Duration::from_millis(100)).await;
        match inner.cluster.snapshot().await {
            Ok(s) => {
                outage.over("reading the cluster");
                if snap.alive.keys().any(|n| !s.alive.contains_key(n)) {
                    inner.alive_gone.send_modify(|n| *n += 1);
                }
                snap = s;
                member.reconcile(snap.clone()).await;
            }
            Err(e) => outage.warn(format_args!("reading the cluster: {e}")),
        }
    }
}

/// How often a task whose etcd requests keep failing logs about it: the first failure at once,
/// then one line in this long, with how many were held back. A node retries every few hundred
/// milliseconds, which during an outage of minutes was thousands of lines per node.
const OUTAGE_LOG_EVERY: Duration = Duration::from_secs(10);

/// One task's warnings about etcd not answering (see [`OUTAGE_LOG_EVERY`]).
#[derive(Default)]
struct Outage {
    since: Option<Instant>,
    logged: Option<Instant>,
    held: u32,
}

impl Outage {
    fn warn(&mut self, msg: std::fmt::Arguments<'_>) {
        let now = Instant::now();
        self.since.get_or_insert(now);
        if self.logged.is_some_and(|t| now.duration_since(t) < OUTAGE_LOG_EVERY) {
            self.held += 1;
            return;
        }
        match self.held {
            0 => tracing::warn!("{msg}"),
            n => tracing::warn!("{msg} ({n} more failures since the last such line)"),
        }
        self.logged = Some(now);
        self.held = 0;
    }

    /// Connects `cluster` again to the members that answer now; whether it could.
    async fn reconnect(&mut self, cluster: &Cluster) -> bool {
        let r = cluster.reconnect().await;
        if let Err(e) = &r {
            self.warn(format_args!("reconnecting to etcd: {e}"));
        }
        r.is_ok()
    }

    /// etcd answered `what` again.
    fn over(&mut self, what: &str) {
        if let Some(since) = self.since.take() {
            tracing::info!("{what}: etcd answers again after {:.1} s", since.elapsed().as_secs_f64());
        }
        self.logged = None;
        self.held = 0;
    }
}

/// Re-protections a node starts per second at most. Each is an etcd transaction; without a bound,
/// the survivors of a lost zone start all of theirs at once when its grace period ends (50,000
/// etcd writes a second at 1,000 nodes in the control-plane simulation, several times what an etcd
/// cluster sustains, and keep-alives wait behind them). 10 a second puts 100 moves of one node
/// 10 s apart, against copies that take minutes each at any realistic volume size.
pub const REPROTECT_STARTS_PER_SEC_MAX: u32 = 10;

/// Gives each volume this node is primary of a new replica elsewhere once its other replica's
/// node has been gone longer than the grace period (the volume's record changes; every node's
/// reconcile then starts, restarts or removes its part). Runs apart from the watch, so that
/// moves, paced by [`REPROTECT_STARTS_PER_SEC_MAX`], never delay a reconcile; looks again after
/// each reconcile and every second (grace periods run out without anything changing in etcd).
async fn reprotector(member: Member) {
    let inner = &member.inner;
    let mut stop = inner.stop.subscribe();
    let gap = Duration::from_secs(1) / REPROTECT_STARTS_PER_SEC_MAX;
    let mut next = Instant::now();
    let grace = inner.cfg.grace;
    loop {
        tokio::select! {
            _ = inner.reprotect_due.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let watched = inner.snapshot.borrow().clone();
        let overdue = member.overdue(&watched);
        if overdue.is_empty() {
            continue;
        }
        // A copy of its own, which each move updates: the next placement counts this one.
        let mut snap = (*watched).clone();
        drop(watched);
        for (name, lost) in overdue {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            if member.connected(&name) {
                continue;
            }
            next = Instant::now() + gap;
            match inner.cluster.replace_replica(&mut snap, &name, &lost, member.name()).await {
                Ok(Some(spec)) => tracing::warn!(
                    volume = %name,
                    %lost,
                    new = %spec.replicas.last().map_or("", String::as_str),
                    "re-protecting: {lost} has been gone longer than {grace:?} (or was removed); a full copy goes to the new \
                     replica"
                ),
                Ok(None) => {}
                Err(e) => tracing::warn!(volume = %name, "cannot re-protect yet: {e}"),
            }
        }
    }
}

/// Applies a watch response to `snap`; false (with a log line) if it could not be.
fn applied(inner: &Inner, snap: &mut Snapshot, resp: &etcd_client::WatchResponse) -> bool {
    let alive = inner.cluster.key("alive/");
    let mut gone = false;
    for e in resp.events().iter().filter(|e| e.event_type() == etcd_client::EventType::Delete) {
        let Some(name) = e.kv().and_then(|kv| kv.key().strip_prefix(alive.as_bytes())) else { continue };
        let name = String::from_utf8_lossy(name);
        tracing::warn!(node = %name, "node {name} is gone from the cluster: its alive key was deleted (lease expired or revoked)");
        gone = true;
    }
    if gone {
        inner.alive_gone.send_modify(|n| *n += 1);
    }
    match inner.cluster.apply(snap, resp) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!("applying a change from etcd: {e}; reading the cluster again");
            false
        }
    }
}
