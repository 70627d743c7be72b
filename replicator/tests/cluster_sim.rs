//! Size: one file, because it is one model (simulated etcd, nodes, replicas and faults interleaved
//! in one event loop, with the checks that read all of them) whose parts are not used apart.
//!
//! A deterministic, seeded simulation of cluster mode's control plane: etcd and up to 1,000 nodes
//! holding 100,000 volumes, with nodes crashing and restarting, a whole zone losing power, nodes cut
//! off from etcd or from each other, and an operator forcing promotions.
//!
//! **The decisions are the real code's.** Placement of every volume is [`placement::place`]; which
//! volumes a node re-protects is [`plan::overdue`], on the node's own `dead_since`, and where the new
//! replica goes is [`plan::replacement`] (so [`placement::replace`]); every authority decision (report,
//! solo, promotion, reclaim, forced promotion) is [`decide_record`] with the etcd authority's inputs
//! (`silent` zero while `alive/PRIMARY` exists, unbounded once it is gone). Timings are the real
//! defaults: the lease TTL ([`DEFAULT_TTL`]), the hold of a request refused because the primary's
//! node is alive ([`RETRY_AFTER`], ended early when the node's watch sees that node's `alive/` key
//! go), the report cache
//! ([`CACHE_FOR`]), and the link timeout, heartbeat and reconnect pause of [`ReplConfig::default`].
//!
//! **What is simulated around them**, following `cluster/authority.rs`, `cluster/member.rs`,
//! `cluster/mod.rs` and `node.rs`:
//! - *etcd*: a key-value map with a global revision and each key's mod revision, version and lease;
//!   transactions with the compares the real code sends (grant CAS: the record's mod revision, the
//!   requester's `alive/` key under its own lease, for a takeover `alive/OLD` still absent;
//!   re-protection: the volume's mod revision, `alive/lost` absent, `alive/new` present; registration:
//!   `alive/NAME` absent; creation: key absent, nothing under `volumes/` changed, chosen nodes alive);
//!   leases with a TTL, renewed by keep-alives and expired by a check every 500 ms, deleting the keys
//!   attached. Each request takes a seeded one-way latency of a few milliseconds, so a decision is
//!   read, made and written at three different moments and the compares matter. A node's requests
//!   about its volumes' records go in batches, as `cluster/batch.rs` sends them: those that reach
//!   etcd within a round trip of the node's previous batch wait for it and go together (one read,
//!   one write).
//! - *nodes*: each registers, keeps its lease alive every grant-lease/2 and holds a standing valid
//!   until two thirds of a TTL after the last answered keep-alive was *sent*; re-registers when etcd
//!   says the lease is gone; applies the changes its watch reports and reconciles 50 ms after one
//!   (starting replicas, moving them to a new peer without stopping them as `Node::set_peer` does,
//!   deleting those moved away, noting since when each member has been dead); re-protects. A node
//!   cut off from etcd gets no answers (requests fail after 1 s) and no watch events until it heals.
//! - *replicas*: a primary and a secondary per volume, connected when both processes run, no
//!   partition separates them, the secondary expects that primary (its configured peer) and has not
//!   accepted a newer epoch. Connecting fences: the secondary takes the primary's epoch, and a
//!   primary that meets a newer epoch (a secondary that accepted one, or a promoted peer's successor
//!   port) steps down. A connected secondary resyncs: incrementally (a second or less) if it holds
//!   the volume, in full otherwise (a new replica), at `bandwidth` bytes per second per receiving
//!   node shared by the copies it receives. A resync is staged, so the copy stays promotable
//!   (`consistent_replica`) unless it overflows staging (here: a full copy of more than 4 GiB). A
//!   primary acknowledges with a connected peer even while it resyncs (durable promises wait for the
//!   commit, so a copy that drops a staged resync loses none). A primary whose peer is away for the
//!   link timeout asks for solo, one link timeout after the link failed; a secondary whose primary
//!   is away asks to be promoted, and a refusal because the primary's node is alive is held until
//!   its `alive/` key goes or `RETRY_AFTER` passes (then it asks again at once); a restarting
//!   primary reclaims; a primary reports in sync once its peer is.
//!
//! **Checked at every step** (after every event, on the volumes it touched), failing the run with
//! the seed to replay it:
//! 1. *never two primaries acknowledging writes* for one volume at one time. A node acknowledges
//!    when it runs as primary and either is connected to its peer (which then accepts its epoch)
//!    or holds a solo grant and its standing under the lease of that grant has not ended. The
//!    standing is the latest keep-alive's, not the grant's (which a report refreshes only every
//!    heartbeat): this errs toward acknowledging longer than the real node, so toward finding
//!    overlaps. Acknowledging only starts at events (a link comes up, a grant arrives, a standing
//!    lapsed is renewed) and only ends with time, so checking at every event misses none.
//!    Also: no epoch is ever held as primary by two nodes.
//! 2. *no unforced promotion loses acknowledged writes*: a copy that was not connected while some
//!    primary acknowledged is marked behind until it resyncs; promoting it without `force` fails.
//! 3. *a volume's replicas are on distinct nodes in distinct zones*, every time `volumes/` is
//!    written.
//! 4. *liveness*: once faults stop, every volume returns, within a deadline, to two in-sync copies on
//!    live nodes (record not solo, primary connected to an in-sync secondary), and copies that moved
//!    away are deleted.
//!
//! Also checked at each phase's end: the loads kept incrementally equal `Snapshot::loads` of a full
//! snapshot of the simulated etcd. Each check is shown to fail on a deliberately broken node model
//! ([`Bug`]): the tests whose names say what they catch.
//!
//! **Found** (and since fixed in the code): check 2 failed on the code as it was, in two ways, both
//! at 300 faults a minute
//! (`CLUSTER_SIM_FAULTS_PER_MIN=300`; none in 600 seeds at CI's 60). A replica moved while the
//! record is not solo (its old secondary was connected but cut off from etcd) leaves the new,
//! empty replica promotable during its copy (seeds 47, 134, 165, 167, 169;
//! `re_protection_can_promote_an_empty_replica`). A replica moved away, still running on a node cut
//! off from etcd, can be promoted once the primary dies, and then deletes its copy (seed 36;
//! `a_replica_moved_away_can_be_promoted`). `solo_on_move`, `reprotect_only_disconnected` and
//! `promote_only_listed` model the three fixes now in the code (`Cluster::replace_replica`,
//! `member.rs` `reprotector`, the etcd authority); they are on by default, and `CLUSTER_SIM_FIXES=0`
//! models the code as it was. 400 seeds at 300 faults a minute pass with them.
//!
//! **Not modelled**: the data path (writes are assumed continuous, so acknowledging means writes
//! were acknowledged); etcd's own capacity, queueing under load, leader changes (which refresh every
//! lease) and compaction; clock drift (the margin in the standing exists for it); a copy's sender's
//! bandwidth (only receivers share theirs); a full copy resuming after an interruption (it restarts);
//! volume creation and deletion during a run (volumes are created at the start, placed one by one,
//! with no concurrent creates to race); the etcd reads of an in-sync primary's reports (one every
//! 5 s each, once the report cache expires: a fifth as many reads per second as volumes); thin
//! volumes (a full copy moves the whole size).
//!
//! **Determinism**: one thread, virtual time in milliseconds, an event queue ordered by (time,
//! sequence number), every random choice from the seed, and only ordered maps where order reaches
//! the schedule: a seed replays the same run (`a_seed_replays_exactly`). `CLUSTER_SIM_SEEDS=n` runs
//! n seeds in CI's test, `CLUSTER_SIM_SEED=s` one, `CLUSTER_SIM_FAULTS_PER_MIN` sets the fault
//! rate (60 in CI), `CLUSTER_SIM_TRACE=VOLUME` prints every event
//! about one volume with its state after it; `benches/cluster-sim.sh` runs the full scale in release.

use std::cmp::{Ordering, Reverse};
use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::fmt;
use std::time::Duration;

use syncblock_engine::sim::Rng;
use syncblock_engine::Epoch;
use syncblock_replicator::cluster::authority::{CACHE_FOR, RETRY_AFTER};
use syncblock_replicator::cluster::member::{DEFAULT_TTL, REPROTECT_STARTS_PER_SEC_MAX};
use syncblock_replicator::cluster::placement::{self, NodeLoad};
use syncblock_replicator::cluster::{plan, GrantDoc, MemberInfo, Snapshot, VolumeSpec};
use syncblock_replicator::wire::{Frame, Refusal};
use syncblock_replicator::witness::{decide_record, Record};
use syncblock_replicator::ReplConfig;
use tokio::time::Instant;

/// Virtual time, in milliseconds since the simulation started.
type Ms = u64;

const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// etcd looks for expired leases this often: a lease ends up to this long after its TTL.
const ETCD_EXPIRY_CHECK_MS: Ms = 500;
/// A node reconciles this long after a change its watch reports (member.rs `watch_cluster`).
const WATCH_DEBOUNCE_MS: Ms = 50;
/// A node re-reads everything this long after its watch is re-established (member.rs).
const WATCH_RESTART_MS: Ms = 500;
/// A node retries re-protection at least this often (member.rs: the watch's idle timer).
const REPROTECT_EVERY_MS: Ms = 1000;
/// A node whose previous lease still holds its alive key tries again this often (member.rs `register`).
const REGISTER_RETRY_MS: Ms = 250;
/// The authority decides again at most this many times when its compare-and-swap loses (authority.rs).
const AUTH_TRIES: u32 = 5;
/// A request from a node cut off from etcd fails after this long (authority.rs: `ask` waits at least 1 s).
const REQUEST_TIMEOUT_MS: Ms = 1000;
/// An operator retries a forced promotion refused `LeaseLive` at most this many times.
const FORCE_TRIES: u32 = 50;
/// An incremental resync takes this long plus up to as much again: seconds of writes at most.
const RESYNC_MS: Ms = 300;
/// A resync's writes are staged outside the committed image up to 1 Mi blocks (docs/replication.md):
/// a larger one overflows and leaves the copy inconsistent (unpromotable) until it commits. Only a
/// full copy of a volume larger than this does here; incremental resyncs are seconds of writes.
const STAGING_BYTES: u64 = (1 << 20) * syncblock_engine::BLOCK_BYTES_U64;
/// The storm measured after a zone fails: this long from the failure (failovers end within ~2 s).
const STORM_MS: Ms = 10_000;

/// Timings of the real code, in milliseconds.
#[derive(Debug, Clone, Copy)]
struct Timing {
    ttl: Ms,
    heartbeat: Ms,
    link_timeout: Ms,
    reconnect: Ms,
    retry_after: Ms,
    cache_for: Ms,
}

impl Timing {
    fn real() -> Timing {
        let repl = ReplConfig::default();
        let ms = |d: Duration| d.as_millis() as Ms;
        Timing {
            ttl: ms(DEFAULT_TTL),
            heartbeat: ms(repl.heartbeat),
            link_timeout: ms(repl.timeout),
            reconnect: ms(repl.reconnect),
            retry_after: ms(RETRY_AFTER),
            cache_for: ms(CACHE_FOR),
        }
    }

    /// member.rs `keep_alive`: every half grant lease, a grant lease being two thirds of the TTL.
    fn keepalive_every(&self) -> Ms {
        (self.ttl * 2 / 3 / 2).max(100)
    }
}

/// Deliberate faults in the node model, each for a test showing that a check catches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bug {
    /// A keep-alive extends the standing to two TTLs after it was sent instead of two thirds: a solo
    /// primary cut off from etcd acknowledges after its lease expired and a forced takeover.
    SoloOutlivesLease,
    /// The secondary's watcher always asks with `force`: it takes over from a solo primary, lacking
    /// the writes that primary acknowledged alone.
    EagerForce,
    /// Re-protection is given loads without zones: a new replica may land in the survivor's zone.
    ZoneBlind,
    /// Re-protection never runs: volumes that lost a replica for good stay degraded.
    NoReprotect,
}

/// A node named directly, or by its role in a volume when the fault happens.
#[derive(Debug, Clone, Copy)]
enum Target {
    Node(u32),
    PrimaryOf(u32),
    SecondaryOf(u32),
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// A process killed (the kernel closes its sockets), or with `silent` a machine losing power;
    /// restarted after `down_ms`.
    Crash { node: Target, silent: bool, down_ms: Option<Ms> },
    /// Cut off from etcd, still reaching its peers.
    CutEtcd { node: Target, ms: Ms },
    /// Two nodes cut off from each other.
    CutPeers { a: Target, b: Target, ms: Ms },
    /// Cut off from etcd and every other node.
    Isolate { node: Target, ms: Ms },
    /// Every node of a zone loses power; restarted after `down_ms`.
    ZoneDown { zone: u32, down_ms: Option<Ms> },
    /// `syncblock promote --force` on the volume's secondary, retried while refused `LeaseLive`.
    Force { vol: u32 },
}

impl Fault {
    /// How long the fault lasts (a forced promotion: its retries).
    fn lasts(&self) -> Ms {
        match *self {
            Fault::Crash { down_ms, .. } | Fault::ZoneDown { down_ms, .. } => down_ms.unwrap_or(0),
            Fault::CutEtcd { ms, .. } | Fault::CutPeers { ms, .. } | Fault::Isolate { ms, .. } => ms,
            Fault::Force { .. } => 10_000,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Heal {
    Restart(u32),
    Etcd(u32),
    Peers(u32, u32),
    Isolate(u32),
}

#[derive(Debug, Clone)]
struct Config {
    seed: u64,
    n_nodes: u32,
    n_zones: u32,
    n_volumes: u32,
    /// Bytes of volume data each node holds.
    capacity: u64,
    /// Volume sizes, drawn uniformly.
    sizes: Vec<u64>,
    /// Bytes per second a node receives, shared by the full copies it receives.
    bandwidth: u64,
    /// The re-protection grace period (`--grace`; 600 s by default, short here so runs stay short).
    grace: Ms,
    /// One-way latency to etcd: at least `etcd_ms`, plus up to `etcd_jitter_ms`.
    etcd_ms: Ms,
    etcd_jitter_ms: Ms,
    /// Length of the random fault phase (0: none), and its rate.
    faults_ms: Ms,
    faults_per_min: u32,
    /// Faults at fixed times from the start of the fault phase.
    script: Vec<(Ms, Fault)>,
    /// After the fault phase, a whole zone fails for good and recovery is measured; then it returns.
    zone_failure: bool,
    /// How long the cluster may take to return to two in-sync copies of everything once faults stop.
    settle_ms: Ms,
    bug: Option<Bug>,
    /// The fix in `Cluster::replace_replica`: its transaction also
    /// marks the grant solo (if unchanged since read), so that the new replica cannot be promoted
    /// before its copy completes. Without it, a volume moved while its record was not solo (its
    /// old secondary connected but cut off from etcd) promotes an empty replica if its primary
    /// dies during the copy (`re_protection_can_promote_an_empty_replica`).
    solo_on_move: bool,
    /// The fix in the etcd authority: a promotion (or reclaim) is
    /// granted only to a node `volumes/NAME` lists, and its transaction compares that record's
    /// revision. Without it, a replica re-protection moved away, still running on a node cut off
    /// from etcd, can be promoted (`a_replica_moved_away_can_be_promoted`), and deletes its copy
    /// at its next reconcile.
    promote_only_listed: bool,
    /// The fix in member.rs `reprotect`: a volume whose replicator is
    /// connected to the lost node (which is only cut off from etcd) is not moved. Without it, an
    /// in-sync report about the old peer, in flight when the move's transaction lands, is decided
    /// again by the authority after its compare fails and clears the solo flag `solo_on_move` set
    /// (found at 300 faults a minute with the two other fixes only); and every replica of a node
    /// cut off from etcd for the grace period is copied again.
    reprotect_only_disconnected: bool,
}

impl Config {
    /// CI's scale: small enough for many seeds in a debug build.
    fn ci(seed: u64) -> Config {
        let fixes = env_u64("CLUSTER_SIM_FIXES").is_none_or(|f| f != 0);
        Config {
            seed,
            n_nodes: 50,
            n_zones: 3,
            n_volumes: 2000,
            capacity: TIB,
            sizes: vec![GIB, 2 * GIB, 4 * GIB],
            bandwidth: GIB,
            grace: 30_000,
            etcd_ms: 1,
            etcd_jitter_ms: 2,
            faults_ms: 120_000,
            faults_per_min: env_u64("CLUSTER_SIM_FAULTS_PER_MIN").map_or(60, |f| f as u32),
            script: Vec::new(),
            zone_failure: true,
            settle_ms: 300_000,
            bug: None,
            solo_on_move: fixes,
            promote_only_listed: fixes,
            reprotect_only_disconnected: fixes,
        }
    }

    /// The issue's scale: 1,000 nodes, 100,000 volumes of 8 to 64 GiB, nodes of 24 TiB (a quarter
    /// full; three eighths once a zone is gone).
    fn full(seed: u64) -> Config {
        Config {
            n_nodes: 1000,
            n_volumes: 100_000,
            capacity: 24 * TIB,
            sizes: vec![8 * GIB, 16 * GIB, 32 * GIB, 64 * GIB],
            faults_per_min: env_u64("CLUSTER_SIM_FAULTS_PER_MIN").map_or(120, |f| f as u32),
            ..Config::ci(seed)
        }
    }

    /// Four nodes in two zones holding one volume: the scripted scenarios.
    fn tiny(script: Vec<(Ms, Fault)>, bug: Option<Bug>) -> Config {
        Config {
            n_nodes: 4,
            n_zones: 2,
            n_volumes: 1,
            faults_ms: 0,
            script,
            zone_failure: false,
            settle_ms: 120_000,
            bug,
            ..Config::ci(1)
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone, Default)]
struct Report {
    seed: u64,
    events: u64,
    virtual_ms: Ms,
    faults: u32,
    /// Secondaries promoted because their primary's node was gone (not reclaims, not forced).
    failovers: u32,
    forced: u32,
    reprotections: u32,
    full_copies: u32,
    resyncs: u32,
    /// The closest call: of the takeovers from a primary still running and holding a solo grant,
    /// the least time between the end of its standing and its successor's grant (negative: overlap).
    closest_ms: Option<i64>,
    zone: Option<ZoneReport>,
}

#[derive(Debug, Clone, Default)]
struct ZoneReport {
    zone: u32,
    nodes: u32,
    /// Volumes with a replica in the zone, and those whose primary was there.
    volumes_hit: u32,
    primaries_hit: u32,
    failovers: u32,
    /// From the failure to the last failover.
    last_failover_ms: Ms,
    /// etcd writes (transactions that changed something, lease grants, revocations and expiries) per
    /// second during the storm's first `STORM_MS`: the busiest second, and the mean.
    storm_writes_peak: u64,
    storm_writes_mean: u64,
    /// Single-key reads per second (the authority's), busiest second of the storm.
    storm_reads_peak: u64,
    /// Watch notifications per second etcd sends (one per write to each watching node; nodes apply
    /// them and read the whole prefix only when their watch breaks), busiest second of the storm.
    storm_watch_events_peak: u64,
    /// Keep-alives per second, compare-and-swaps that lost, and whole-prefix reads the simulated
    /// nodes made (after a start or a broken watch, and re-protection's), in the storm.
    storm_keepalives_peak: u64,
    storm_failed_txns: u64,
    storm_node_reads_peak: u64,
    reprotections: u32,
    /// The busiest second of etcd writes once re-protection starts, and of whole-prefix reads by
    /// nodes (re-protection decides from each node's watched copy and reads none of its own).
    reprotect_writes_peak: u64,
    reprotect_node_reads_peak: u64,
    copy_bytes: u64,
    /// How long the copies would take with every receiving node busy all along at `bandwidth`, and
    /// how long the node receiving the most takes on its own.
    copy_ideal_ms: Ms,
    copy_busiest_ms: Ms,
    /// From the failure until this fraction of the hit volumes has two in-sync copies again:
    /// 50%, 90%, 99%, all.
    healthy_ms: [Ms; 4],
}

#[derive(Debug)]
struct Failure {
    seed: u64,
    at: Ms,
    what: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (seed, at) = (self.seed, secs(self.at));
        write!(
            f,
            "seed {seed} at {at:.3} s: {} (replay: CLUSTER_SIM_SEED={seed} and this run's other CLUSTER_SIM_*)",
            self.what
        )
    }
}

fn secs(ms: Ms) -> f64 {
    ms as f64 / 1000.0
}

// ---- etcd --------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Member(u32),
    Alive(u32),
    Volume(u32),
    Grant(u32),
    /// The `volumes/` prefix, for creation's "nothing under it changed" compare.
    Volumes,
}

#[derive(Debug, Clone, Copy, Default)]
struct Meta {
    mod_rev: i64,
    version: i64,
    lease: i64,
}

#[derive(Debug, Clone, Copy)]
enum Field {
    Version,
    ModRev,
    Lease,
}

#[derive(Debug, Clone, Copy)]
struct Cmp {
    key: Key,
    field: Field,
    op: Ordering,
    value: i64,
}

fn cmp(key: Key, field: Field, op: Ordering, value: i64) -> Cmp {
    Cmp { key, field, op, value }
}

enum Put {
    Member(u32, Box<MemberInfo>),
    Alive(u32, i64),
    Volume(u32, VolumeSpec),
    Grant(u32, GrantDoc),
}

/// The simulated etcd's data. The simulation applies writes (`Sim::txn`), since they update its
/// indexes and wake the watchers.
struct Etcd {
    rev: i64,
    members: Vec<Option<(Meta, MemberInfo)>>,
    alive: Vec<Option<Meta>>,
    volumes: Vec<Option<(Meta, VolumeSpec)>>,
    grants: Vec<Option<(Meta, GrantDoc)>>,
    volumes_mod_max: i64,
    /// Lease id → (node, expiry).
    leases: BTreeMap<i64, (u32, Ms)>,
    next_lease: i64,
    n_keys: u64,
}

impl Etcd {
    fn meta(&self, key: Key) -> Option<Meta> {
        match key {
            Key::Member(n) => self.members[n as usize].as_ref().map(|e| e.0),
            Key::Alive(n) => self.alive[n as usize],
            Key::Volume(v) => self.volumes[v as usize].as_ref().map(|e| e.0),
            Key::Grant(v) => self.grants[v as usize].as_ref().map(|e| e.0),
            Key::Volumes => Some(Meta { mod_rev: self.volumes_mod_max, ..Meta::default() }),
        }
    }

    /// etcd compares a missing key as version, revisions and lease zero.
    fn holds(&self, c: &Cmp) -> bool {
        let m = self.meta(c.key).unwrap_or_default();
        let got = match c.field {
            Field::Version => m.version,
            Field::ModRev => m.mod_rev,
            Field::Lease => m.lease,
        };
        got.cmp(&c.value) == c.op
    }

    fn spec(&self, v: u32) -> Option<&VolumeSpec> {
        self.volumes[v as usize].as_ref().map(|e| &e.1)
    }

    fn grant(&self, v: u32) -> Option<&GrantDoc> {
        self.grants[v as usize].as_ref().map(|e| &e.1)
    }
}

/// etcd's load in one virtual second.
#[derive(Debug, Clone, Copy, Default)]
struct Sec {
    writes: u64,
    reads: u64,
    txn_failed: u64,
    keepalives: u64,
    /// Whole-prefix reads the simulated nodes made (a first reconcile after a start or a broken
    /// watch).
    node_reads: u64,
    /// Watch notifications: each write, to every watching node.
    watch_events: u64,
}

// ---- nodes and replicas -------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// A restarting primary waiting for its reclaim's answer.
    Starting,
    Primary,
    Secondary,
    /// Granted the primary role but unable to take it: node.rs `promote_as` has stopped the
    /// secondary and `Primary::start` refused, and nothing restarts it until the process restarts.
    Stopped,
}

/// A primary's connection to its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Down,
    Connecting(u32),
    Up,
}

/// A replicator node running one volume's replica (lost when the process dies).
#[derive(Debug, Clone, Copy)]
struct Run {
    /// Unique per run and role: events of an earlier one are dropped.
    gen: u32,
    role: Role,
    /// The other replica's node when this run started.
    peer: u32,
    /// Acknowledging alone on a solo grant, under the node's standing for `solo_lease`.
    solo: bool,
    solo_lease: i64,
    link: Link,
    /// When this primary noticed its peer away.
    away_since: Ms,
    /// Secondary: the primary connected to it, and whether the resync from it is complete.
    upstream: Option<u32>,
    in_sync: bool,
    sync_token: u32,
    /// Loops with an event pending: asking for solo, asking to be promoted, reporting.
    soloing: bool,
    promoting: bool,
    reporting: bool,
    report_again: bool,
    /// A primary's report or solo request is in flight: the owner sends one at a time
    /// (`witness_asking` in primary/owner), so a solo grant and a report never cross.
    asking: bool,
}

impl Run {
    fn new(gen: u32, role: Role, peer: u32, now: Ms) -> Run {
        Run {
            gen,
            role,
            peer,
            solo: false,
            solo_lease: 0,
            link: Link::Down,
            away_since: now,
            upstream: None,
            in_sync: false,
            sync_token: 0,
            soloing: false,
            promoting: false,
            reporting: false,
            report_again: false,
            asking: false,
        }
    }
}

/// The authority's report cache entry for a volume (authority.rs `cache`): the record as last read
/// or written, under which lease, when.
#[derive(Debug, Clone, Copy)]
struct Cache {
    inc: u32,
    epoch: u64,
    solo: bool,
    synced: bool,
    lease: i64,
    at: Ms,
}

/// A node's copy of a volume, kept across restarts.
#[derive(Debug, Clone)]
struct Replica {
    node: u32,
    pair: u64,
    /// The role it last had (`ReplState::role`).
    primary: bool,
    /// Its epoch as primary, or the newest it accepted as secondary.
    epoch: u64,
    consistent: bool,
    /// Holds the volume's data (a new replica of a written volume needs a full copy).
    has_data: bool,
    /// The checker's: it may lack a write some primary acknowledged.
    behind: bool,
    cache: Option<Cache>,
    run: Option<Run>,
}

struct Node {
    name: String,
    zone: u32,
    alive: bool,
    /// Died without closing its sockets: peers notice after the link timeout.
    silent: bool,
    /// Incarnation: events of an earlier life are dropped.
    inc: u32,
    etcd_cut: u32,
    isolated: u32,
    peers_cut: BTreeMap<u32, u32>,
    /// Registered in this life (watching the cluster).
    joined: bool,
    lease: i64,
    valid_until: Option<Ms>,
    /// The last standing under each lease: a solo grant acts under its lease's.
    lease_valid: BTreeMap<i64, Ms>,
    /// Volumes with a copy here, and volumes whose record lists this node.
    copies: BTreeSet<u32>,
    held: BTreeSet<u32>,
    /// The volumes and grants of `held`, as in the node's snapshot: what `plan::overdue` reads (it
    /// looks at no other volume), kept as etcd changes rather than rebuilt for every pass.
    snap: Snapshot,
    dead_since: BTreeMap<String, Instant>,
    alive_cursor: usize,
    full_reconcile: bool,
    pending: BTreeSet<u32>,
    reconcile_scheduled: bool,
    reprotect_due: bool,
    last_pass: Ms,
    replacing: VecDeque<(u32, u32)>,
    replace_busy: bool,
    /// When this node may start its next re-protection (member.rs `reprotector`'s pacing).
    next_replace_at: Ms,
    /// Full copies this node receives: volume → bytes left.
    copies_in: BTreeMap<u32, f64>,
    copy_at: Ms,
    copy_gen: u32,
    /// Bytes of full copies this node has started receiving.
    received: u64,
    /// Its requests' reads and grant transactions, batched (`cluster/batch.rs`).
    batches: [Batches; 2],
}

/// A node's requests of one kind (reads, or grant transactions) waiting for its batch in flight,
/// when that batch's answer is back, and whether the next batch is scheduled.
#[derive(Default)]
struct Batches {
    // Boxed: a request moves from event to event as a `Box<Req>`.
    #[allow(clippy::vec_box)]
    queue: Vec<Box<Req>>,
    slots: Vec<Ms>,
    due: bool,
}

/// Which of a node's [`Batches`]: `Batches[READS]` and `Batches[TXNS]`.
const READS: usize = 0;
const TXNS: usize = 1;

struct Vol {
    name: String,
    size: u64,
    copies: Vec<Replica>,
    /// The record's nodes, and the granted primary (if the grant is of this incarnation).
    spec_nodes: Vec<u32>,
    grant_primary: Option<u32>,
    /// Some primary has acknowledged writes.
    acked: bool,
    /// Who held each epoch as primary.
    epochs: BTreeMap<u64, u32>,
    healthy: bool,
    stale: u32,
}

// ---- events ------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ask {
    Report,
    Solo,
    Promote,
    Reclaim,
    Force { tries: u32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AskErr {
    Refused(Refusal),
    /// etcd did not answer, the node's standing is not current, or the record kept changing.
    Unreachable,
}

/// Takes a node's batch slot for a batch reaching etcd `now` (`cluster/batch.rs`: one batch in
/// flight until its answer is back, a round trip later; more only beside a batch stalled for
/// `BATCH_STALL`, which this simulated etcd never does); if it is taken, when it frees.
fn take_slot(slots: &mut Vec<Ms>, now: Ms, round_trip: Ms) -> Result<(), Ms> {
    slots.retain(|end| *end > now);
    if slots.is_empty() {
        slots.push(now + round_trip);
        Ok(())
    } else {
        Err(slots.iter().copied().min().expect("slots in use"))
    }
}

/// An authority request on its way (authority.rs `decide`).
#[derive(Debug)]
struct Req {
    vol: u32,
    node: u32,
    inc: u32,
    gen: u32,
    ask: Ask,
    frame: Frame,
    pair: u64,
    /// The standing when the request started: its grant acts under it.
    lease: i64,
    valid_until: Ms,
    sent: Ms,
    tries: u32,
    rev: i64,
    /// With `promote_only_listed`: the revision of `volumes/NAME` the decision was made from.
    spec_rev: Option<i64>,
    takeover_of: Option<u32>,
    new: Option<GrantDoc>,
    result: Option<Result<GrantDoc, AskErr>>,
    /// Answered on the node itself (from the cache, or refused for a lapsed standing).
    local: bool,
    /// Refused because the primary's node is alive: held until then for its `alive/` key to go.
    hold_until: Option<Ms>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Became {
    First,
    Failover,
    Reclaim,
    Forced,
}

#[derive(Debug)]
enum Ev {
    EtcdTick,
    FaultTick,
    Fault(Fault),
    Heal(Heal, u32),
    Register {
        node: u32,
        inc: u32,
    },
    RegisterAtEtcd {
        node: u32,
        inc: u32,
        sent: Ms,
    },
    Registered {
        node: u32,
        inc: u32,
        lease: i64,
        sent: Ms,
    },
    KeepAlive {
        node: u32,
        inc: u32,
        lease: i64,
    },
    KeepAliveAtEtcd {
        node: u32,
        inc: u32,
        lease: i64,
        sent: Ms,
    },
    KeepAliveAnswer {
        node: u32,
        inc: u32,
        lease: i64,
        sent: Ms,
        ok: bool,
    },
    Reconcile {
        node: u32,
        inc: u32,
    },
    ReprotectTick {
        node: u32,
        inc: u32,
    },
    ReplaceNext {
        node: u32,
        inc: u32,
    },
    ReplaceRead {
        node: u32,
        inc: u32,
        vol: u32,
        lost: u32,
        sent: Ms,
    },
    ReplaceTxn {
        node: u32,
        inc: u32,
        vol: u32,
        lost: u32,
        new: u32,
        rev: (i64, i64),
        moved: Box<VolumeSpec>,
        sent: Ms,
    },
    Ask {
        vol: u32,
        node: u32,
        gen: u32,
        ask: Ask,
    },
    AuthRead(Box<Req>),
    /// Requests held for `node`'s `alive/` key to go whose hold ends now are refused.
    HoldEnd {
        node: u32,
    },
    AuthTxn(Box<Req>),
    /// A node's queued reads (`kind` READS) or grant transactions (TXNS) reach etcd, together.
    AuthBatch {
        node: u32,
        kind: usize,
    },
    AuthAnswer(Box<Req>),
    LinkUp {
        vol: u32,
        node: u32,
        gen: u32,
        token: u32,
    },
    Depose {
        vol: u32,
        node: u32,
        gen: u32,
    },
    ResyncDone {
        vol: u32,
        node: u32,
        gen: u32,
        token: u32,
    },
    CopyCheck {
        node: u32,
        gen: u32,
    },
}

struct Item {
    at: Ms,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Item {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Item {}

impl PartialOrd for Item {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Item {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// Where a primary's connection attempt to its peer ends.
enum Outcome {
    Link(usize),
    NoLink,
    /// The copy at this index meets a newer epoch and steps down.
    Deposed(usize),
}

struct ZoneWatch {
    at: Ms,
    report: ZoneReport,
    failovers_before: u32,
    reprotections_before: u32,
    copy_bytes_before: u64,
    received_before: u64,
    healthy_at: [Option<Ms>; 4],
}

// ---- the simulation ----------------------------------------------------------------------------

struct Sim {
    cfg: Config,
    t: Timing,
    rng: Rng,
    now: Ms,
    base: Instant,
    seq: u64,
    queue: BinaryHeap<Reverse<Item>>,
    etcd: Etcd,
    nodes: Vec<Node>,
    by_name: HashMap<String, u32>,
    vols: Vec<Vol>,
    vol_by_name: HashMap<String, u32>,
    /// Placement's view of every member, kept as etcd changes (checked against `Snapshot::loads`).
    loads: Vec<NodeLoad>,
    /// Volumes by the node that is their primary (`Snapshot::primary_of`).
    primary_of: Vec<BTreeSet<u32>>,
    /// Nodes whose `alive/` key changed, in order: each node's reconcile reads on from its cursor.
    alive_log: Vec<u32>,
    next_gen: u32,
    n_healthy: usize,
    n_stale: u64,
    n_live: u64,
    /// Bumped when every fault is healed at once, so older heal events are dropped.
    fault_epoch: u32,
    faults_until: Ms,
    zone_down: Option<u32>,
    secs: Vec<Sec>,
    report: Report,
    copy_bytes: u64,
    last_failover: Ms,
    /// Requests held because the primary's node was alive, by that node (authority.rs
    /// `RETRY_AFTER`): the node's watch reporting its `alive/` key gone decides them again.
    #[allow(clippy::vec_box)]
    held: BTreeMap<u32, Vec<(Ms, Box<Req>)>>,
    zone_watch: Option<ZoneWatch>,
    violation: Option<String>,
    bugs_on: bool,
    /// `CLUSTER_SIM_TRACE=VOLUME`: print every event about that volume, and its state after it.
    trace: Option<u32>,
}

impl Sim {
    fn new(cfg: Config) -> Sim {
        let n = cfg.n_nodes as usize;
        let nodes = (0..cfg.n_nodes)
            .map(|i| Node {
                name: format!("n{i:04}"),
                zone: i % cfg.n_zones,
                alive: true,
                silent: false,
                inc: 0,
                etcd_cut: 0,
                isolated: 0,
                peers_cut: BTreeMap::new(),
                joined: false,
                lease: 0,
                valid_until: None,
                lease_valid: BTreeMap::new(),
                copies: BTreeSet::new(),
                held: BTreeSet::new(),
                snap: Snapshot::default(),
                dead_since: BTreeMap::new(),
                alive_cursor: 0,
                full_reconcile: true,
                pending: BTreeSet::new(),
                reconcile_scheduled: false,
                reprotect_due: false,
                last_pass: 0,
                replacing: VecDeque::new(),
                replace_busy: false,
                next_replace_at: 0,
                copies_in: BTreeMap::new(),
                copy_at: 0,
                copy_gen: 0,
                received: 0,
                batches: Default::default(),
            })
            .collect::<Vec<_>>();
        let vols = (0..cfg.n_volumes)
            .map(|v| Vol {
                name: format!("v{v:06}"),
                size: 0,
                copies: Vec::new(),
                spec_nodes: Vec::new(),
                grant_primary: None,
                acked: false,
                epochs: BTreeMap::new(),
                healthy: false,
                stale: 0,
            })
            .collect::<Vec<_>>();
        let nv = cfg.n_volumes as usize;
        Sim {
            t: Timing::real(),
            rng: Rng::new(cfg.seed),
            now: 0,
            base: Instant::now(),
            seq: 0,
            queue: BinaryHeap::new(),
            etcd: Etcd {
                rev: 1,
                members: vec![None; n],
                alive: vec![None; n],
                volumes: vec![None; nv],
                grants: vec![None; nv],
                volumes_mod_max: 0,
                leases: BTreeMap::new(),
                next_lease: 0x1000,
                n_keys: 0,
            },
            by_name: nodes.iter().enumerate().map(|(i, n)| (n.name.clone(), i as u32)).collect(),
            vol_by_name: vols.iter().enumerate().map(|(i, v)| (v.name.clone(), i as u32)).collect(),
            nodes,
            vols,
            loads: Vec::new(),
            primary_of: vec![BTreeSet::new(); n],
            alive_log: Vec::new(),
            next_gen: 0,
            n_healthy: 0,
            n_stale: 0,
            n_live: cfg.n_nodes as u64,
            fault_epoch: 0,
            faults_until: 0,
            zone_down: None,
            secs: Vec::new(),
            report: Report { seed: cfg.seed, ..Report::default() },
            copy_bytes: 0,
            last_failover: 0,
            held: BTreeMap::new(),
            zone_watch: None,
            violation: None,
            bugs_on: false,
            trace: env_u64("CLUSTER_SIM_TRACE").map(|v| v as u32),
            cfg,
        }
    }

    // ---- plumbing ----

    fn at(&mut self, delay: Ms, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse(Item { at: self.now + delay, seq: self.seq, ev }));
    }

    /// One-way latency between a node and etcd.
    fn d(&mut self) -> Ms {
        self.cfg.etcd_ms + self.rng.below(self.cfg.etcd_jitter_ms + 1)
    }

    fn jitter(&mut self, upto: Ms) -> Ms {
        self.rng.below(upto)
    }

    fn instant(&self, t: Ms) -> Instant {
        self.base + Duration::from_millis(t)
    }

    fn sec(&mut self) -> &mut Sec {
        let s = (self.now / 1000) as usize;
        if self.secs.len() <= s {
            self.secs.resize(s + 1, Sec::default());
        }
        &mut self.secs[s]
    }

    fn fail(&mut self, what: String) {
        if self.violation.is_none() {
            self.violation = Some(what);
        }
    }

    fn new_gen(&mut self) -> u32 {
        self.next_gen += 1;
        self.next_gen
    }

    fn current(&self, node: u32, inc: u32) -> bool {
        let n = &self.nodes[node as usize];
        n.alive && n.inc == inc
    }

    fn cut(&self, node: u32) -> bool {
        let n = &self.nodes[node as usize];
        n.etcd_cut > 0 || n.isolated > 0
    }

    fn reachable(&self, a: u32, b: u32) -> bool {
        let (na, nb) = (&self.nodes[a as usize], &self.nodes[b as usize]);
        na.alive && nb.alive && na.isolated == 0 && nb.isolated == 0 && !na.peers_cut.contains_key(&b)
    }

    /// How long `observer` takes to notice its link to `other` is gone: at once when `other`'s
    /// process died or stopped the replica (its sockets close), the link timeout otherwise.
    fn detect(&self, observer: u32, other: u32) -> Ms {
        let o = &self.nodes[other as usize];
        if !o.alive {
            if o.silent {
                self.t.link_timeout
            } else {
                0
            }
        } else if self.reachable(observer, other) {
            0
        } else {
            self.t.link_timeout
        }
    }

    /// The deliberate fault, once the fault phase has begun (setup runs the real model).
    fn bug(&self) -> Option<Bug> {
        self.cfg.bug.filter(|_| self.bugs_on)
    }

    fn standing_end(&self, sent: Ms) -> Ms {
        match self.bug() {
            Some(Bug::SoloOutlivesLease) => sent + 2 * self.t.ttl,
            _ => sent + self.t.ttl * 2 / 3,
        }
    }

    fn standing_ok(&self, node: u32) -> bool {
        self.nodes[node as usize].valid_until.is_some_and(|t| self.now < t)
    }

    fn copy_idx(&self, v: u32, node: u32) -> Option<usize> {
        self.vols[v as usize].copies.iter().position(|c| c.node == node)
    }

    /// The copy of `v` on `node` if that node still runs it as run `gen`.
    fn live(&self, v: u32, node: u32, gen: u32) -> Option<usize> {
        if !self.nodes[node as usize].alive {
            return None;
        }
        self.vols[v as usize].copies.iter().position(|c| c.node == node && c.run.is_some_and(|r| r.gen == gen))
    }

    fn run(&self, v: u32, i: usize) -> Run {
        self.vols[v as usize].copies[i].run.expect("running")
    }

    fn run_mut(&mut self, v: u32, i: usize) -> &mut Run {
        self.vols[v as usize].copies[i].run.as_mut().expect("running")
    }

    fn all_healthy(&self) -> bool {
        self.n_healthy == self.vols.len()
    }

    // ---- etcd writes and what they wake ----

    fn wrote(&mut self) {
        let live = self.n_live;
        let sec = self.sec();
        sec.writes += 1;
        sec.watch_events += live;
    }

    fn txn(&mut self, when: &[Cmp], puts: Vec<Put>) -> bool {
        if !when.iter().all(|c| self.etcd.holds(c)) {
            self.sec().txn_failed += 1;
            return false;
        }
        self.etcd.rev += 1;
        self.wrote();
        for put in puts {
            self.apply(put);
        }
        true
    }

    fn apply(&mut self, put: Put) {
        let rev = self.etcd.rev;
        let bump =
            |old: Option<Meta>, lease: i64| Meta { mod_rev: rev, version: old.map_or(1, |m| m.version + 1), lease };
        match put {
            Put::Member(n, info) => {
                let old = self.etcd.meta(Key::Member(n));
                self.etcd.n_keys += u64::from(old.is_none());
                self.etcd.members[n as usize] = Some((bump(old, 0), *info));
            }
            Put::Alive(n, lease) => {
                let old = self.etcd.alive[n as usize];
                self.etcd.n_keys += u64::from(old.is_none());
                self.etcd.alive[n as usize] = Some(bump(old, lease));
                self.alive_changed(n);
            }
            Put::Volume(v, spec) => {
                self.load(v, false);
                let old_nodes = std::mem::take(&mut self.vols[v as usize].spec_nodes);
                for &n in &old_nodes {
                    let node = &mut self.nodes[n as usize];
                    node.held.remove(&v);
                    node.snap.volumes.remove(&spec.name);
                    node.snap.grants.remove(&spec.name);
                }
                let nodes: Vec<u32> = spec.replicas.iter().map(|r| self.by_name[r]).collect();
                for &n in &nodes {
                    let node = &mut self.nodes[n as usize];
                    node.held.insert(v);
                    node.snap.volumes.insert(spec.name.clone(), spec.clone());
                    if let Some((_, g)) = &self.etcd.grants[v as usize] {
                        node.snap.grants.insert(spec.name.clone(), g.clone());
                    }
                }
                let old = self.etcd.meta(Key::Volume(v));
                self.etcd.n_keys += u64::from(old.is_none());
                let vol = &mut self.vols[v as usize];
                vol.size = spec.size;
                vol.spec_nodes = nodes.clone();
                self.etcd.volumes[v as usize] = Some((bump(old, 0), spec));
                self.etcd.volumes_mod_max = rev;
                self.refresh_grant_primary(v);
                self.load(v, true);
                self.check_spec(v);
                let mut wake: BTreeSet<u32> = old_nodes.into_iter().chain(nodes).collect();
                wake.extend(self.vols[v as usize].copies.iter().map(|c| c.node));
                self.wake(v, wake);
                self.touch(v);
            }
            Put::Grant(v, grant) => {
                self.load(v, false);
                let old = self.etcd.meta(Key::Grant(v));
                self.etcd.n_keys += u64::from(old.is_none());
                let name = &self.vols[v as usize].name;
                for &n in &self.vols[v as usize].spec_nodes {
                    self.nodes[n as usize].snap.grants.insert(name.clone(), grant.clone());
                }
                self.etcd.grants[v as usize] = Some((bump(old, 0), grant));
                self.refresh_grant_primary(v);
                self.load(v, true);
                let mut wake: BTreeSet<u32> = self.vols[v as usize].spec_nodes.iter().copied().collect();
                wake.extend(self.vols[v as usize].copies.iter().map(|c| c.node));
                self.wake(v, wake);
                self.after_grant(v);
                self.touch(v);
            }
        }
    }

    fn refresh_grant_primary(&mut self, v: u32) {
        let primary = match (self.etcd.spec(v), self.etcd.grant(v)) {
            (Some(spec), Some(g)) if g.pair == spec.id => Some(self.by_name[&g.primary]),
            _ => None,
        };
        self.vols[v as usize].grant_primary = primary;
    }

    /// `Snapshot::primary_of`, by index.
    fn primary_idx(&self, v: u32) -> Option<u32> {
        let vol = &self.vols[v as usize];
        vol.grant_primary.or_else(|| vol.spec_nodes.first().copied())
    }

    /// Adds the volume to (or takes it from) the loads, as `Snapshot::loads` counts it.
    fn load(&mut self, v: u32, add: bool) {
        if self.etcd.spec(v).is_none() || self.loads.is_empty() {
            return;
        }
        let size = self.vols[v as usize].size;
        let primary = self.primary_idx(v);
        let id = self.etcd.spec(v).map(|s| s.id);
        let copying = self.etcd.grant(v).is_some_and(|g| Some(g.pair) == id && g.solo);
        for n in self.vols[v as usize].spec_nodes.clone() {
            let l = &mut self.loads[n as usize];
            let incoming = if copying && Some(n) != primary { size } else { 0 };
            if add {
                l.committed += size;
                l.replicas += 1;
                l.incoming += incoming;
            } else {
                l.committed -= size;
                l.replicas -= 1;
                l.incoming -= incoming;
            }
        }
        if let Some(p) = primary {
            if add {
                self.loads[p as usize].primaries += 1;
                self.primary_of[p as usize].insert(v);
            } else {
                self.loads[p as usize].primaries -= 1;
                self.primary_of[p as usize].remove(&v);
            }
        }
    }

    /// Every node watches the whole prefix; these are the ones whose reconcile has something to do.
    fn wake(&mut self, v: u32, nodes: BTreeSet<u32>) {
        for n in nodes {
            if self.nodes[n as usize].alive {
                self.nodes[n as usize].pending.insert(v);
                self.schedule_reconcile(n, 0);
            }
        }
    }

    fn schedule_reconcile(&mut self, n: u32, extra: Ms) {
        let node = &self.nodes[n as usize];
        if !node.alive || !node.joined || node.reconcile_scheduled {
            return;
        }
        let inc = node.inc;
        self.nodes[n as usize].reconcile_scheduled = true;
        let d = self.d();
        self.at(WATCH_DEBOUNCE_MS + d + extra, Ev::Reconcile { node: n, inc });
    }

    fn alive_changed(&mut self, n: u32) {
        self.alive_log.push(n);
        if let Some(l) = self.loads.get_mut(n as usize) {
            l.alive = self.etcd.alive[n as usize].is_some();
        }
        for other in 0..self.cfg.n_nodes {
            self.schedule_reconcile(other, 0);
        }
    }

    /// A running primary the record no longer names learns it from its next report that reads etcd:
    /// within the report cache's life.
    fn after_grant(&mut self, v: u32) {
        let Some(g) = self.etcd.grant(v) else { return };
        let (epoch, primary) = (g.epoch, self.by_name[&g.primary]);
        let stale: Vec<usize> = (self.vols[v as usize].copies.iter().enumerate())
            .filter(|(_, c)| c.run.is_some_and(|r| r.role == Role::Primary) && (c.node != primary || c.epoch != epoch))
            .map(|(i, _)| i)
            .collect();
        for i in stale {
            let delay = self.jitter(self.t.cache_for);
            self.report_in(v, i, delay);
        }
    }

    fn on_hold_end(&mut self, node: u32) {
        let Some(held) = self.held.remove(&node) else { return };
        let (over, left): (Vec<_>, Vec<_>) = held.into_iter().partition(|(until, _)| *until <= self.now);
        if !left.is_empty() {
            self.held.insert(node, left);
        }
        for (_, req) in over {
            self.answer(req, Err(AskErr::Refused(Refusal::PrimaryAlive { retry_after_ms: 1 })));
        }
    }

    fn on_etcd_tick(&mut self) {
        let now = self.now;
        let expired: Vec<i64> = self.etcd.leases.iter().filter(|(_, e)| e.1 <= now).map(|(id, _)| *id).collect();
        for id in expired {
            let (n, _) = self.etcd.leases.remove(&id).expect("listed");
            self.etcd.rev += 1;
            self.wrote();
            if self.etcd.alive[n as usize].is_some_and(|m| m.lease == id) {
                self.etcd.alive[n as usize] = None;
                self.etcd.n_keys -= 1;
                self.alive_changed(n);
                // The held requests' nodes see the key go (their watch) and decide again.
                for (_, req) in self.held.remove(&n).unwrap_or_default() {
                    let d = self.d() * 2;
                    self.at(d, Ev::AuthRead(req));
                }
            }
        }
        self.at(ETCD_EXPIRY_CHECK_MS, Ev::EtcdTick);
    }

    // ---- checks ----

    fn check_spec(&mut self, v: u32) {
        let vol = &self.vols[v as usize];
        let mut clash = None;
        for (k, &a) in vol.spec_nodes.iter().enumerate() {
            for &b in &vol.spec_nodes[..k] {
                let (na, nb) = (&self.nodes[a as usize], &self.nodes[b as usize]);
                if a == b || na.zone == nb.zone {
                    let what = if a == b { "a node".to_string() } else { format!("zone z{}", na.zone) };
                    clash = Some(format!("volume {}: replicas on {} and {} share {what}", vol.name, na.name, nb.name));
                }
            }
        }
        if let Some(what) = clash {
            self.fail(what);
        }
    }

    fn acking(&self, c: &Replica) -> bool {
        let Some(r) = &c.run else { return false };
        let node = &self.nodes[c.node as usize];
        r.role == Role::Primary
            && node.alive
            && (r.link == Link::Up || (r.solo && node.lease_valid.get(&r.solo_lease).is_some_and(|&t| self.now < t)))
    }

    /// Re-evaluates a volume's links and loops, then checks it.
    fn touch(&mut self, v: u32) {
        self.relink(v);
        self.check(v);
    }

    fn check(&mut self, v: u32) {
        let vol = &self.vols[v as usize];
        let ackers: Vec<usize> = (0..vol.copies.len()).filter(|&i| self.acking(&vol.copies[i])).collect();
        if ackers.len() > 1 {
            let describe = |i: usize| {
                let c = &vol.copies[i];
                let r = c.run.expect("running");
                let how = if r.link == Link::Up {
                    format!("with its peer {}", self.nodes[r.peer as usize].name)
                } else {
                    let until = self.nodes[c.node as usize].lease_valid[&r.solo_lease];
                    format!("alone, its standing valid until {:.3} s", secs(until))
                };
                format!("{} in epoch {} ({how})", self.nodes[c.node as usize].name, c.epoch)
            };
            let what = format!(
                "volume {}: two primaries acknowledging writes: {} and {}",
                vol.name,
                describe(ackers[0]),
                describe(ackers[1])
            );
            self.fail(what);
        }
        if let [a] = ackers[..] {
            let vol = &mut self.vols[v as usize];
            vol.acked = true;
            let acker = vol.copies[a].node;
            let ra = vol.copies[a].run.expect("running");
            for (k, c) in vol.copies.iter_mut().enumerate() {
                let partner =
                    ra.link == Link::Up && c.node == ra.peer && c.run.is_some_and(|r| r.upstream == Some(acker));
                if k != a && !partner {
                    c.behind = true;
                }
            }
        }
        let healthy = self.healthy(v);
        let vol = &mut self.vols[v as usize];
        if healthy != vol.healthy {
            vol.healthy = healthy;
            if healthy {
                self.n_healthy += 1;
            } else {
                self.n_healthy -= 1;
            }
        }
        let stale = vol.copies.iter().filter(|c| !vol.spec_nodes.contains(&c.node)).count() as u32;
        self.n_stale = self.n_stale + u64::from(stale) - u64::from(vol.stale);
        vol.stale = stale;
        if let Some(z) = &mut self.zone_watch {
            let unhealthy = self.vols.len() - self.n_healthy;
            let hit = z.report.volumes_hit as usize;
            let limits = [hit / 2, hit / 10, hit / 100, 0];
            for (at, limit) in z.healthy_at.iter_mut().zip(limits) {
                if at.is_none() && unhealthy <= limit {
                    *at = Some(self.now - z.at);
                }
            }
        }
    }

    /// Two in-sync copies on live nodes: the record's primary connected to an in-sync secondary, the
    /// record not solo.
    fn healthy(&self, v: u32) -> bool {
        let vol = &self.vols[v as usize];
        let (Some(spec), Some(g), Some(p)) = (self.etcd.spec(v), self.etcd.grant(v), vol.grant_primary) else {
            return false;
        };
        if g.solo || !g.synced || spec.replicas.len() != 2 || !vol.spec_nodes.contains(&p) {
            return false;
        }
        let s = vol.spec_nodes.iter().copied().find(|&n| n != p).expect("two nodes");
        let run_of = |n: u32| vol.copies.iter().find(|c| c.node == n).and_then(|c| c.run.map(|r| (c.epoch, r)));
        let (Some((epoch, rp)), Some((_, rs))) = (run_of(p), run_of(s)) else { return false };
        self.nodes[p as usize].alive
            && self.nodes[s as usize].alive
            && rp.role == Role::Primary
            && epoch == g.epoch
            && rp.link == Link::Up
            && rp.peer == s
            && rs.role == Role::Secondary
            && rs.upstream == Some(p)
            && rs.in_sync
    }

    /// The loads kept as etcd changed equal those `Snapshot::loads` computes from a full snapshot.
    fn check_loads(&mut self) {
        let mut snap = Snapshot { revision: self.etcd.rev, ..Snapshot::default() };
        for (n, m) in self.etcd.members.iter().enumerate() {
            if let Some((_, info)) = m {
                snap.members.insert(info.name.clone(), info.clone());
            }
            if let Some(a) = self.etcd.alive[n] {
                snap.alive.insert(self.nodes[n].name.clone(), a.lease);
            }
        }
        for v in 0..self.vols.len() {
            if let Some((_, spec)) = &self.etcd.volumes[v] {
                snap.volumes.insert(spec.name.clone(), spec.clone());
            }
            if let Some((_, g)) = &self.etcd.grants[v] {
                snap.grants.insert(self.vols[v].name.clone(), g.clone());
            }
        }
        if snap.loads() != self.loads {
            self.fail("the loads kept incrementally differ from Snapshot::loads".into());
        }
    }

    // ---- links ----

    fn outcome(&self, v: u32, i: usize) -> Outcome {
        let copies = &self.vols[v as usize].copies;
        let c = &copies[i];
        let r = c.run.expect("running");
        let Some(j) = copies.iter().position(|d| d.node == r.peer) else { return Outcome::NoLink };
        let d = &copies[j];
        let Some(dr) = d.run else { return Outcome::NoLink };
        // A hello names its node: a replica expecting another peer refuses it before anything else.
        if !self.reachable(c.node, d.node) || d.pair != c.pair || dr.peer != c.node {
            return Outcome::NoLink;
        }
        match dr.role {
            Role::Secondary if d.epoch > c.epoch => Outcome::Deposed(i),
            Role::Secondary => Outcome::Link(j),
            Role::Primary if d.epoch > c.epoch => Outcome::Deposed(i),
            Role::Primary if d.epoch < c.epoch => Outcome::Deposed(j),
            Role::Primary | Role::Starting | Role::Stopped => Outcome::NoLink,
        }
    }

    fn relink(&mut self, v: u32) {
        for i in 0..self.vols[v as usize].copies.len() {
            let c = &self.vols[v as usize].copies[i];
            let Some(r) = c.run.filter(|r| r.role == Role::Primary) else { continue };
            let node = c.node;
            match self.outcome(v, i) {
                Outcome::Link(_) => {
                    if r.link == Link::Down {
                        let token = self.new_gen();
                        self.run_mut(v, i).link = Link::Connecting(token);
                        let delay = self.t.reconnect / 2 + self.jitter(self.t.reconnect);
                        self.at(delay, Ev::LinkUp { vol: v, node, gen: r.gen, token });
                    }
                }
                Outcome::NoLink => {
                    if r.link != Link::Down {
                        self.drop_link(v, i);
                    }
                }
                Outcome::Deposed(k) => {
                    if r.link != Link::Down {
                        self.drop_link(v, i);
                    }
                    let loser = &self.vols[v as usize].copies[k];
                    let (lnode, lgen) = (loser.node, loser.run.expect("running").gen);
                    let delay = self.t.reconnect;
                    self.at(delay, Ev::Depose { vol: v, node: lnode, gen: lgen });
                }
            }
        }
        for i in 0..self.vols[v as usize].copies.len() {
            self.ensure_loops(v, i);
        }
    }

    /// Drops primary `i`'s link; its secondary stops receiving and starts asking.
    fn drop_link(&mut self, v: u32, i: usize) {
        let (pnode, r) = (self.vols[v as usize].copies[i].node, self.run(v, i));
        let away = self.now + self.detect(pnode, r.peer);
        let run = self.run_mut(v, i);
        run.link = Link::Down;
        run.away_since = away;
        let Some(j) = self.copy_idx(v, r.peer) else { return };
        if self.vols[v as usize].copies[j].run.is_some_and(|d| d.upstream == Some(pnode)) {
            let dnode = self.vols[v as usize].copies[j].node;
            let d = self.run_mut(v, j);
            d.upstream = None;
            d.in_sync = false;
            d.sync_token = 0;
            self.copy_remove(dnode, v);
        }
    }

    fn ensure_loops(&mut self, v: u32, i: usize) {
        let c = &self.vols[v as usize].copies[i];
        let Some(r) = c.run else { return };
        let (node, gen) = (c.node, r.gen);
        match r.role {
            Role::Primary if r.link != Link::Up && !r.solo && !r.soloing => {
                // One link timeout after the link failed (timers.rs `ask_solo_if_due`): the
                // volumes that lost a link with one node together all ask at once.
                let when = (r.away_since + self.t.link_timeout).max(self.now);
                self.run_mut(v, i).soloing = true;
                self.at(when - self.now, Ev::Ask { vol: v, node, gen, ask: Ask::Solo });
            }
            Role::Secondary if r.upstream.is_none() && !r.promoting => {
                let delay = self.detect(node, r.peer);
                self.run_mut(v, i).promoting = true;
                self.at(delay, Ev::Ask { vol: v, node, gen, ask: Ask::Promote });
            }
            _ => {}
        }
    }

    fn on_link_up(&mut self, v: u32, node: u32, gen: u32, token: u32) {
        let Some(i) = self.live(v, node, gen) else { return };
        if self.run(v, i).link != Link::Connecting(token) {
            return;
        }
        let Outcome::Link(j) = self.outcome(v, i) else {
            self.run_mut(v, i).link = Link::Down;
            self.touch(v);
            return;
        };
        let epoch = self.vols[v as usize].copies[i].epoch;
        let run = self.run_mut(v, i);
        run.link = Link::Up;
        let token = self.new_gen();
        let vol = &mut self.vols[v as usize];
        let (acked, size) = (vol.acked, vol.size);
        let d = &mut vol.copies[j];
        // The secondary records the primary's epoch before applying anything of it. A resync is
        // staged, so the committed image stays promotable, unless it overflows staging.
        d.epoch = epoch;
        let full = !d.has_data && acked;
        if full && size > STAGING_BYTES {
            d.consistent = false;
        }
        let (dnode, dgen) = (d.node, d.run.expect("running").gen);
        let dr = d.run.as_mut().expect("running");
        dr.upstream = Some(node);
        dr.in_sync = false;
        dr.sync_token = token;
        if full {
            self.report.full_copies += 1;
            self.copy_bytes += size;
            self.copy_add(dnode, v, size);
        } else {
            self.report.resyncs += 1;
            let delay = RESYNC_MS + self.jitter(RESYNC_MS);
            self.at(delay, Ev::ResyncDone { vol: v, node: dnode, gen: dgen, token });
        }
        self.touch(v);
    }

    /// Secondary `j` has everything its primary has.
    fn synced(&mut self, v: u32, j: usize) {
        let upstream = self.run(v, j).upstream.expect("connected");
        let Some(i) = self.copy_idx(v, upstream) else { return };
        let behind = self.vols[v as usize].copies[i].behind;
        let d = &mut self.vols[v as usize].copies[j];
        d.consistent = true;
        d.has_data = true;
        d.behind = behind;
        d.run.as_mut().expect("running").in_sync = true;
        self.report_in(v, i, 0);
        self.touch(v);
    }

    fn on_resync_done(&mut self, v: u32, node: u32, gen: u32, token: u32) {
        let Some(j) = self.live(v, node, gen) else { return };
        if self.run(v, j).sync_token == token && self.run(v, j).upstream.is_some() {
            self.synced(v, j);
        }
    }

    fn on_depose(&mut self, v: u32, node: u32, gen: u32) {
        let Some(i) = self.live(v, node, gen) else { return };
        if self.run(v, i).role != Role::Primary {
            return;
        }
        // Still facing a newer epoch on a connection it can make.
        let c = &self.vols[v as usize].copies[i];
        let newer = self.vols[v as usize].copies.iter().any(|d| {
            d.pair == c.pair
                && d.epoch > c.epoch
                && d.run
                    .is_some_and(|dr| dr.role != Role::Starting && (dr.peer == c.node || d.node == self.run(v, i).peer))
                && self.reachable(c.node, d.node)
        });
        if newer {
            self.step_down(v, i);
        }
    }

    // ---- full copies, sharing each receiving node's bandwidth ----

    fn copy_advance(&mut self, n: u32) {
        let per_ms = self.cfg.bandwidth as f64 / 1000.0;
        let node = &mut self.nodes[n as usize];
        let k = node.copies_in.len() as f64;
        if k > 0.0 {
            let done = per_ms * (self.now - node.copy_at) as f64 / k;
            for left in node.copies_in.values_mut() {
                *left -= done;
            }
        }
        node.copy_at = self.now;
    }

    fn copy_reschedule(&mut self, n: u32) {
        let per_ms = self.cfg.bandwidth as f64 / 1000.0;
        let node = &mut self.nodes[n as usize];
        node.copy_gen += 1;
        let gen = node.copy_gen;
        let k = node.copies_in.len() as f64;
        if let Some(least) = node.copies_in.values().copied().reduce(f64::min) {
            let delay = (least.max(0.0) * k / per_ms).ceil() as Ms;
            self.at(delay, Ev::CopyCheck { node: n, gen });
        }
    }

    fn copy_add(&mut self, n: u32, v: u32, bytes: u64) {
        self.nodes[n as usize].received += bytes;
        self.copy_advance(n);
        self.nodes[n as usize].copies_in.insert(v, bytes as f64);
        self.copy_reschedule(n);
    }

    fn copy_remove(&mut self, n: u32, v: u32) {
        if self.nodes[n as usize].copies_in.contains_key(&v) {
            self.copy_advance(n);
            self.nodes[n as usize].copies_in.remove(&v);
            self.copy_reschedule(n);
        }
    }

    fn on_copy_check(&mut self, n: u32, gen: u32) {
        if self.nodes[n as usize].copy_gen != gen {
            return;
        }
        self.copy_advance(n);
        let done: Vec<u32> =
            self.nodes[n as usize].copies_in.iter().filter(|(_, left)| **left < 1.0).map(|(v, _)| *v).collect();
        for v in &done {
            self.nodes[n as usize].copies_in.remove(v);
        }
        self.copy_reschedule(n);
        for v in done {
            if let Some(j) = self.copy_idx(v, n).filter(|&j| self.vols[v as usize].copies[j].run.is_some()) {
                self.synced(v, j);
            }
        }
    }

    // ---- roles ----

    fn report_in(&mut self, v: u32, i: usize, delay: Ms) {
        let c = &self.vols[v as usize].copies[i];
        let Some(r) = c.run.filter(|r| r.role == Role::Primary) else { return };
        if r.reporting {
            self.run_mut(v, i).report_again = true;
            return;
        }
        let node = c.node;
        self.run_mut(v, i).reporting = true;
        self.at(delay, Ev::Ask { vol: v, node, gen: r.gen, ask: Ask::Report });
    }

    /// Starts this node's replica of `v` (member.rs `start_volume`, node.rs `Node::start`).
    fn start_replica(&mut self, v: u32, n: u32) {
        let vol = &self.vols[v as usize];
        let Some(peer) = vol.spec_nodes.iter().copied().find(|&x| x != n) else { return };
        let first = vol.spec_nodes.first() == Some(&n);
        let id = self.etcd.spec(v).expect("listed").id;
        let i = match self.copy_idx(v, n) {
            Some(i) => i,
            None => {
                let acked = vol.acked;
                self.vols[v as usize].copies.push(Replica {
                    node: n,
                    pair: id,
                    primary: first,
                    epoch: 0,
                    consistent: true,
                    // A copy of a volume never written to is complete; any other new copy is empty.
                    has_data: !acked,
                    behind: acked,
                    cache: None,
                    run: None,
                });
                self.nodes[n as usize].copies.insert(v);
                self.vols[v as usize].copies.len() - 1
            }
        };
        let gen = self.new_gen();
        let c = &mut self.vols[v as usize].copies[i];
        let role = match (c.primary, c.epoch) {
            (true, 0) => Role::Primary,
            (true, _) => Role::Starting,
            (false, _) => Role::Secondary,
        };
        c.run = Some(Run::new(gen, role, peer, self.now));
        match role {
            Role::Primary => {
                // The first start ever: epoch 1 with no grant; its first report registers it.
                self.became(v, i, 1, Became::First);
                let delay = self.jitter(self.t.heartbeat);
                self.report_in(v, i, delay);
            }
            Role::Starting => self.send(v, i, Ask::Reclaim),
            Role::Secondary | Role::Stopped => {}
        }
        self.touch(v);
    }

    /// Re-protected: the other replica moved (node.rs `Node::set_peer`). The replica keeps running
    /// in its role and epoch; a primary drops its link and connects to the new peer, and counts its
    /// peer away from now (solo consent, if it had it, stays).
    fn set_peer(&mut self, v: u32, i: usize, peer: u32) {
        let r = self.run(v, i);
        if r.role == Role::Primary && r.link == Link::Up {
            self.drop_link(v, i);
        }
        let now = self.now;
        let run = self.run_mut(v, i);
        run.peer = peer;
        if run.role == Role::Primary {
            run.link = Link::Down;
            run.away_since = now;
        }
        self.touch(v);
    }

    /// Stops a running replica: its links drop, a copy it received stops.
    fn kill_run(&mut self, v: u32, i: usize) {
        let Some(r) = self.vols[v as usize].copies[i].run else { return };
        let node = self.vols[v as usize].copies[i].node;
        if r.role == Role::Primary && r.link == Link::Up {
            self.drop_link(v, i);
        }
        if let Some(p) = r.upstream {
            if let Some(pi) = self.copy_idx(v, p) {
                if self.vols[v as usize].copies[pi].run.is_some_and(|pr| pr.link == Link::Up && pr.peer == node) {
                    self.drop_link(v, pi);
                }
            }
        }
        self.copy_remove(node, v);
        self.vols[v as usize].copies[i].run = None;
    }

    fn delete_copy(&mut self, v: u32, i: usize) {
        self.kill_run(v, i);
        let c = self.vols[v as usize].copies.remove(i);
        self.nodes[c.node as usize].copies.remove(&v);
    }

    /// Records that copy `i` holds `epoch` as primary; no epoch may be held by two nodes.
    fn became(&mut self, v: u32, i: usize, epoch: u64, how: Became) {
        let node = self.vols[v as usize].copies[i].node;
        let holder = *self.vols[v as usize].epochs.entry(epoch).or_insert(node);
        if holder != node {
            let what = format!(
                "volume {}: epoch {epoch} held as primary by {} and by {} ({how:?})",
                self.vols[v as usize].name, self.nodes[holder as usize].name, self.nodes[node as usize].name
            );
            self.fail(what);
        }
        let c = &mut self.vols[v as usize].copies[i];
        c.primary = true;
        c.epoch = epoch;
    }

    /// Takes the primary role on a grant (node.rs `promote_as`, primary `Primary::start`). False if
    /// the grant is not newer than this copy's epoch (`Primary::start` refuses).
    fn become_primary(&mut self, v: u32, i: usize, g: &GrantDoc, lease: i64, how: Became) -> bool {
        let c = &self.vols[v as usize].copies[i];
        if g.epoch <= c.epoch || !c.consistent {
            return false;
        }
        if how != Became::Forced && c.behind {
            let what = format!(
                "volume {}: {} promoted ({how:?}, epoch {}) lacking writes a primary acknowledged",
                self.vols[v as usize].name, self.nodes[c.node as usize].name, g.epoch
            );
            self.fail(what);
        }
        match how {
            // The operator accepted losing what the copy lacks.
            Became::Forced => {
                self.report.forced += 1;
                self.vols[v as usize].copies[i].behind = false;
            }
            Became::Failover => {
                self.report.failovers += 1;
                self.last_failover = self.now;
            }
            Became::First | Became::Reclaim => {}
        }
        if matches!(how, Became::Failover | Became::Forced) {
            let ends: Vec<Ms> = (self.vols[v as usize].copies.iter())
                .filter(|c| self.nodes[c.node as usize].alive)
                .filter_map(|c| c.run.filter(|r| r.role == Role::Primary && r.solo).map(|r| (c.node, r.solo_lease)))
                .filter_map(|(n, lease)| self.nodes[n as usize].lease_valid.get(&lease).copied())
                .collect();
            for end in ends {
                let margin = self.now as i64 - end as i64;
                self.report.closest_ms = Some(self.report.closest_ms.map_or(margin, |m| m.min(margin)));
            }
        }
        let peer = self.run(v, i).peer;
        self.kill_run(v, i);
        self.became(v, i, g.epoch, how);
        let gen = self.new_gen();
        let mut run = Run::new(gen, Role::Primary, peer, self.now);
        // A solo grant lets the new primary acknowledge alone at once.
        run.solo = g.solo;
        run.solo_lease = lease;
        let c = &mut self.vols[v as usize].copies[i];
        c.consistent = true;
        c.run = Some(run);
        self.touch(v);
        true
    }

    fn become_secondary(&mut self, v: u32, i: usize) {
        let peer = self.run(v, i).peer;
        self.kill_run(v, i);
        let gen = self.new_gen();
        let c = &mut self.vols[v as usize].copies[i];
        c.primary = false;
        c.run = Some(Run::new(gen, Role::Secondary, peer, self.now));
        self.touch(v);
    }

    fn stop_for_good(&mut self, v: u32, i: usize) {
        let peer = self.run(v, i).peer;
        self.kill_run(v, i);
        let gen = self.new_gen();
        self.vols[v as usize].copies[i].run = Some(Run::new(gen, Role::Stopped, peer, self.now));
        self.touch(v);
    }

    /// Deposed: steps down to secondary; the new primary resyncs it (node.rs).
    fn step_down(&mut self, v: u32, i: usize) {
        self.become_secondary(v, i);
    }

    // ---- authority requests (authority.rs `Etcd::decide`) ----

    fn on_ask(&mut self, v: u32, node: u32, gen: u32, ask: Ask) {
        let Some(i) = self.live(v, node, gen) else { return };
        let r = self.run(v, i);
        match ask {
            Ask::Report | Ask::Solo if r.asking => {
                // The next report tick after the request in flight is answered.
                let delay = self.t.heartbeat;
                self.at(delay, Ev::Ask { vol: v, node, gen, ask });
            }
            Ask::Report => self.send(v, i, ask),
            Ask::Solo => {
                if r.role != Role::Primary || r.link == Link::Up || r.solo {
                    self.run_mut(v, i).soloing = false;
                } else if self.now < r.away_since + self.t.link_timeout {
                    let delay = r.away_since + self.t.link_timeout - self.now;
                    self.at(delay, Ev::Ask { vol: v, node, gen, ask });
                } else {
                    self.send(v, i, ask);
                }
            }
            Ask::Promote => {
                let consistent = self.vols[v as usize].copies[i].consistent;
                if r.role != Role::Secondary || r.upstream.is_some() {
                    self.run_mut(v, i).promoting = false;
                } else if !consistent && self.bug() != Some(Bug::EagerForce) {
                    // node.rs `promote_as`: a half-applied resync is refused before asking.
                    let delay = self.t.link_timeout / 2;
                    self.at(delay, Ev::Ask { vol: v, node, gen, ask });
                } else {
                    self.send(v, i, ask);
                }
            }
            Ask::Reclaim => {}
            Ask::Force { .. } => {
                if r.role == Role::Secondary {
                    self.send(v, i, ask);
                }
            }
        }
    }

    fn send(&mut self, v: u32, i: usize, ask: Ask) {
        let c = &self.vols[v as usize].copies[i];
        let r = c.run.expect("running");
        let (n, epoch, pair, consistent) = (c.node, Epoch(c.epoch), c.pair, c.consistent);
        let volume = self.vols[v as usize].name.clone();
        let name = self.nodes[n as usize].name.clone();
        let in_sync = r.link == Link::Up
            && self.copy_idx(v, r.peer).is_some_and(|j| self.vols[v as usize].copies[j].run.is_some_and(|d| d.in_sync));
        let frame = match ask {
            Ask::Report => Frame::WitnessReport { pair, volume, node: name, epoch, in_sync },
            Ask::Solo => Frame::WitnessSolo { pair, volume, node: name, epoch },
            Ask::Promote | Ask::Reclaim | Ask::Force { .. } => Frame::WitnessPromote {
                pair,
                volume,
                node: name,
                epoch,
                consistent,
                force: matches!(ask, Ask::Force { .. }) || self.bug() == Some(Bug::EagerForce),
                reclaim: ask == Ask::Reclaim,
            },
        };
        if ask == Ask::Report && in_sync && r.solo {
            // The peer has everything again: back to confirming every write with it, before the
            // witness hears that the pair is in sync (timers.rs `report_to_witness`).
            self.run_mut(v, i).solo = false;
        }
        if matches!(ask, Ask::Report | Ask::Solo) {
            self.run_mut(v, i).asking = true;
        }
        let node = &self.nodes[n as usize];
        let mut req = Box::new(Req {
            vol: v,
            node: n,
            inc: node.inc,
            gen: r.gen,
            ask,
            frame,
            pair,
            lease: node.lease,
            valid_until: node.valid_until.unwrap_or(0),
            sent: self.now,
            tries: 0,
            rev: 0,
            spec_rev: None,
            takeover_of: None,
            new: None,
            result: None,
            local: false,
            hold_until: None,
        });
        if !self.standing_ok(n) {
            req.local = true;
            req.result = Some(Err(AskErr::Unreachable));
            self.at(0, Ev::AuthAnswer(req));
            return;
        }
        if ask == Ask::Report {
            let cached = self.vols[v as usize].copies[i].cache.filter(|g| {
                g.inc == req.inc
                    && g.epoch == epoch.0
                    && g.lease == req.lease
                    && self.now < g.at + self.t.cache_for
                    && !(in_sync && (g.solo || !g.synced))
            });
            if let Some(g) = cached {
                let primary = self.nodes[n as usize].name.clone();
                req.local = true;
                req.result = Some(Ok(GrantDoc { pair, epoch: g.epoch, primary, solo: g.solo, synced: g.synced }));
                self.at(0, Ev::AuthAnswer(req));
                return;
            }
        }
        if self.cut(n) {
            self.answer_timeout(req);
            return;
        }
        let d = self.d();
        self.at(d, Ev::AuthRead(req));
    }

    fn answer(&mut self, mut req: Box<Req>, result: Result<GrantDoc, AskErr>) {
        req.result = Some(result);
        let d = self.d();
        self.at(d, Ev::AuthAnswer(req));
    }

    /// The request or its answer was lost: the node hears nothing until its timeout.
    fn answer_timeout(&mut self, mut req: Box<Req>) {
        req.result = Some(Err(AskErr::Unreachable));
        let at = (req.sent + REQUEST_TIMEOUT_MS).max(self.now);
        self.at(at - self.now, Ev::AuthAnswer(req));
    }

    /// A request's reads reach etcd. A node sends its reads in batches, as its transactions
    /// (`cluster/batch.rs`, and [`Sim::on_auth_txn`]): the grant and volume records of every request
    /// in a batch are one read, and the `alive/` keys those that need them read, one more (taken
    /// here at the same instant).
    fn on_auth_read(&mut self, req: Box<Req>) {
        self.enqueue(READS, req);
    }

    /// A request reaches etcd (`kind`: its reads, or its grant transaction): with the node's next
    /// batch of that kind if one is in flight or others wait, or at once.
    fn enqueue(&mut self, kind: usize, req: Box<Req>) {
        if self.cut(req.node) {
            return self.answer_timeout(req);
        }
        let n = req.node as usize;
        let (now, round_trip) = (self.now, 2 * self.cfg.etcd_ms);
        let b = &mut self.nodes[n].batches[kind];
        let slot = if b.queue.is_empty() { take_slot(&mut b.slots, now, round_trip) } else { Err(now) };
        match slot {
            Ok(()) => self.send_batch(n as u32, kind, vec![req]),
            Err(free_at) => {
                b.queue.push(req);
                if !std::mem::replace(&mut b.due, true) {
                    self.at(free_at.saturating_sub(now), Ev::AuthBatch { node: n as u32, kind });
                }
            }
        }
    }

    fn on_auth_batch(&mut self, node: u32, kind: usize) {
        let n = node as usize;
        let (now, round_trip) = (self.now, 2 * self.cfg.etcd_ms);
        let b = &mut self.nodes[n].batches[kind];
        b.due = false;
        if let Err(free_at) = take_slot(&mut b.slots, now, round_trip) {
            b.due = true;
            return self.at(free_at - now, Ev::AuthBatch { node, kind });
        }
        // Requests of an earlier life of the node were never sent.
        let (inc, alive) = (self.nodes[n].inc, self.nodes[n].alive);
        let queued = std::mem::take(&mut self.nodes[n].batches[kind].queue);
        let queued: Vec<Box<Req>> = queued.into_iter().filter(|r| alive && r.inc == inc).collect();
        if queued.is_empty() {
            return;
        }
        if self.cut(node) {
            for req in queued {
                self.answer_timeout(req);
            }
            return;
        }
        self.send_batch(node, kind, queued);
    }

    #[allow(clippy::vec_box)]
    fn send_batch(&mut self, node: u32, kind: usize, reqs: Vec<Box<Req>>) {
        if kind == READS {
            self.read_batch(reqs)
        } else {
            self.commit_batch(node, reqs)
        }
    }

    #[allow(clippy::vec_box)]
    fn read_batch(&mut self, reqs: Vec<Box<Req>>) {
        self.sec().reads += 1;
        let mut alive_read = false;
        for req in reqs {
            alive_read |= self.decide_read(req);
        }
        if alive_read {
            self.sec().reads += 1;
        }
    }

    /// Decides one request from what etcd holds now (authority.rs `Etcd::decide`); whether it read
    /// an `alive/` key.
    fn decide_read(&mut self, mut req: Box<Req>) -> bool {
        let v = req.vol;
        let (doc, rev) = match &self.etcd.grants[v as usize] {
            Some((m, g)) => (Some(g.clone()), m.mod_rev),
            None => (None, 0),
        };
        if doc.as_ref().is_some_and(|d| req.pair != 0 && d.pair != req.pair) {
            self.answer(req, Err(AskErr::Refused(Refusal::NotRegistered)));
            return false;
        }
        let me = self.nodes[req.node as usize].name.clone();
        if self.cfg.promote_only_listed && matches!(req.ask, Ask::Promote | Ask::Reclaim | Ask::Force { .. }) {
            // Read with the grant, in the same request.
            let listed = self.etcd.spec(v).is_some_and(|spec| spec.replicas.contains(&me));
            if !listed {
                self.answer(req, Err(AskErr::Refused(Refusal::NotRegistered)));
                return false;
            }
            req.spec_rev = self.etcd.meta(Key::Volume(v)).map(|m| m.mod_rev);
        }
        let mut record = doc.as_ref().map(|d| Record {
            volume: self.vols[v as usize].name.clone(),
            epoch: Epoch(d.epoch),
            primary: d.primary.clone(),
            solo: d.solo,
            synced: d.synced,
        });
        let other = record.as_ref().filter(|r| r.primary != me).map(|r| self.by_name[&r.primary]);
        let other_alive = other.is_none_or(|o| self.etcd.alive[o as usize].is_some());
        let silent = if other_alive { Duration::ZERO } else { Duration::MAX };
        let (decision, changed) = decide_record(&mut record, req.pair, &req.frame, silent, RETRY_AFTER * 2 / 3);
        match decision {
            Err((Refusal::PrimaryAlive { .. }, _)) => {
                // authority.rs: held for up to `RETRY_AFTER` from the first refusal, decided again
                // as soon as the node's watch sees the primary's `alive/` key go; refused after the
                // hold, the node asks again at once.
                let until = *req.hold_until.get_or_insert(self.now + self.t.retry_after);
                match other {
                    Some(o) if self.now < until => {
                        self.held.entry(o).or_default().push((until, req));
                        self.at(until - self.now, Ev::HoldEnd { node: o });
                    }
                    _ => self.answer(req, Err(AskErr::Refused(Refusal::PrimaryAlive { retry_after_ms: 1 }))),
                }
            }
            Err((why, _)) => self.answer(req, Err(AskErr::Refused(why))),
            Ok(r) => {
                let new = GrantDoc {
                    pair: doc.as_ref().map_or(req.pair, |d| d.pair),
                    epoch: r.epoch.0,
                    primary: r.primary.clone(),
                    solo: r.solo,
                    synced: r.synced,
                };
                if changed {
                    req.rev = rev;
                    // Taken over because the primary's node is gone: only while it still is.
                    req.takeover_of = other.filter(|_| !other_alive && r.primary == me);
                    req.new = Some(new);
                    let d = self.d() * 2;
                    self.at(d, Ev::AuthTxn(req));
                } else {
                    self.answer(req, Ok(new));
                }
            }
        }
        other.is_some()
    }

    /// A grant transaction reaches etcd. A node sends its grant transactions in batches
    /// (`cluster/batch.rs`): one that reaches etcd while the node's previous batch is still in
    /// flight (less than a round trip after it reached etcd) waited at the node for its answer,
    /// and goes with the others that waited, a round trip after the previous one.
    fn on_auth_txn(&mut self, req: Box<Req>) {
        self.enqueue(TXNS, req);
    }

    /// One etcd request of nested transactions, one per volume (a second one for a volume waits
    /// for the next batch, as `batch.rs` does): one revision and one write if any of them
    /// changed something.
    #[allow(clippy::vec_box)]
    fn commit_batch(&mut self, node: u32, reqs: Vec<Box<Req>>) {
        let n = node as usize;
        let mut seen = BTreeSet::new();
        let mut puts = Vec::new();
        let mut held = Vec::new();
        for req in reqs {
            if !seen.insert(req.vol) {
                let round_trip = 2 * self.cfg.etcd_ms;
                let b = &mut self.nodes[n].batches[TXNS];
                b.queue.push(req);
                if !std::mem::replace(&mut b.due, true) {
                    self.at(round_trip, Ev::AuthBatch { node, kind: TXNS });
                }
                continue;
            }
            let v = req.vol;
            let mut when = vec![
                if req.rev == 0 {
                    cmp(Key::Grant(v), Field::Version, Ordering::Equal, 0)
                } else {
                    cmp(Key::Grant(v), Field::ModRev, Ordering::Equal, req.rev)
                },
                cmp(Key::Alive(req.node), Field::Lease, Ordering::Equal, req.lease),
            ];
            if let Some(p) = req.takeover_of {
                when.push(cmp(Key::Alive(p), Field::Version, Ordering::Equal, 0));
            }
            if let Some(rev) = req.spec_rev {
                when.push(cmp(Key::Volume(v), Field::ModRev, Ordering::Equal, rev));
            }
            // The nested transactions touch different records: each decides on what was there
            // before the batch.
            let ok = when.iter().all(|c| self.etcd.holds(c));
            if ok {
                puts.push(Put::Grant(v, req.new.clone().expect("decided")));
            } else {
                self.sec().txn_failed += 1;
            }
            held.push((req, ok));
        }
        if !puts.is_empty() {
            self.etcd.rev += 1;
            self.wrote();
            for put in puts {
                self.apply(put);
            }
        }
        for (mut req, ok) in held {
            if ok {
                let new = req.new.clone().expect("decided");
                self.answer(req, Ok(new));
            } else {
                // The record moved, or this node's lease did: decide again from what is there now.
                req.tries += 1;
                if req.tries >= AUTH_TRIES {
                    self.answer(req, Err(AskErr::Unreachable));
                } else {
                    let d = self.d() * 2;
                    self.at(d, Ev::AuthRead(req));
                }
            }
        }
    }

    fn on_auth_answer(&mut self, mut req: Box<Req>) {
        let (v, n) = (req.vol, req.node);
        if !self.current(n, req.inc) {
            return;
        }
        if !req.local && self.cut(n) && req.result != Some(Err(AskErr::Unreachable)) {
            return self.answer_timeout(req);
        }
        let Some(i) = self.live(v, n, req.gen) else { return };
        let result = req.result.take().expect("answered");
        // authority.rs inserts what it read or wrote, not what it answered from the cache.
        if let (Ok(g), false) = (&result, req.local) {
            let cache =
                Cache { inc: req.inc, epoch: g.epoch, solo: g.solo, synced: g.synced, lease: req.lease, at: self.now };
            self.vols[v as usize].copies[i].cache = Some(cache);
        }
        let epoch = self.vols[v as usize].copies[i].epoch;
        let deposed = matches!(result, Err(AskErr::Refused(Refusal::Deposed { epoch: e })) if e.0 > epoch);
        let node = n;
        let gen = req.gen;
        if matches!(req.ask, Ask::Report | Ask::Solo) {
            self.run_mut(v, i).asking = false;
        }
        match req.ask {
            Ask::Report => {
                self.run_mut(v, i).reporting = false;
                match result {
                    Ok(_) if req.local => {
                        // Answered from the cache: the primary goes on reporting every heartbeat,
                        // and the first report after the entry expires reads etcd (and learns of a
                        // record changed meanwhile, or records that the pair is in sync).
                        if self.run(v, i).solo {
                            self.run_mut(v, i).solo_lease = req.lease;
                        }
                        let left = self.vols[v as usize].copies[i].cache.map_or(0, |c| c.at + self.t.cache_for);
                        let delay = left.saturating_sub(self.now) + self.jitter(self.t.heartbeat);
                        self.report_in(v, i, delay);
                        self.check(v);
                    }
                    Ok(_) => {
                        let r = self.run_mut(v, i);
                        if r.solo {
                            r.solo_lease = req.lease;
                        }
                        let again = std::mem::take(&mut r.report_again);
                        if again {
                            self.report_in(v, i, 0);
                        }
                        // A renewed solo lease may let it acknowledge again.
                        self.check(v);
                    }
                    Err(_) if deposed => self.step_down(v, i),
                    Err(_) => {
                        let delay = self.t.heartbeat;
                        self.report_in(v, i, delay);
                    }
                }
            }
            Ask::Solo => {
                self.run_mut(v, i).soloing = false;
                match result {
                    Ok(_) if self.now < req.valid_until && self.run(v, i).role == Role::Primary => {
                        let r = self.run_mut(v, i);
                        r.solo = true;
                        r.solo_lease = req.lease;
                        self.touch(v);
                    }
                    Err(_) if deposed => self.step_down(v, i),
                    _ => {
                        self.run_mut(v, i).soloing = true;
                        let delay = self.t.heartbeat;
                        self.at(delay, Ev::Ask { vol: v, node, gen, ask: Ask::Solo });
                    }
                }
            }
            Ask::Promote => {
                let retry = match result {
                    Ok(ref g) => {
                        if !self.become_primary(v, i, g, req.lease, Became::Failover) {
                            self.stop_for_good(v, i);
                        }
                        false
                    }
                    Err(_) => true,
                };
                if retry {
                    let delay = match result {
                        Err(AskErr::Refused(Refusal::PrimaryAlive { retry_after_ms })) => {
                            retry_after_ms.clamp(10, self.t.link_timeout)
                        }
                        _ => self.t.link_timeout / 2,
                    };
                    self.at(delay, Ev::Ask { vol: v, node, gen, ask: Ask::Promote });
                }
            }
            Ask::Reclaim => match result {
                Ok(g) => {
                    if !self.become_primary(v, i, &g, req.lease, Became::Reclaim) {
                        // `Node::start` failed: member.rs tries again at its next reconcile.
                        self.kill_run(v, i);
                        self.nodes[n as usize].pending.insert(v);
                        self.touch(v);
                    }
                }
                // node.rs `restart_as_primary`: refused or unreachable, it starts as secondary.
                Err(_) => self.become_secondary(v, i),
            },
            Ask::Force { tries } => match result {
                Ok(g) => {
                    if !self.become_primary(v, i, &g, req.lease, Became::Forced) {
                        self.stop_for_good(v, i);
                    }
                }
                Err(AskErr::Refused(Refusal::LeaseLive { retry_after_ms })) if tries < FORCE_TRIES => {
                    self.at(retry_after_ms, Ev::Ask { vol: v, node, gen, ask: Ask::Force { tries: tries + 1 } });
                }
                Err(_) => {}
            },
        }
    }

    // ---- membership (member.rs) ----

    fn on_register(&mut self, node: u32, inc: u32) {
        if !self.current(node, inc) {
            return;
        }
        if self.cut(node) {
            self.at(REQUEST_TIMEOUT_MS, Ev::Register { node, inc });
            return;
        }
        let d = self.d();
        let sent = self.now;
        self.at(d, Ev::RegisterAtEtcd { node, inc, sent });
    }

    fn on_register_at_etcd(&mut self, node: u32, inc: u32, sent: Ms) {
        if self.cut(node) {
            let at = (sent + REQUEST_TIMEOUT_MS).max(self.now);
            self.at(at - self.now, Ev::Register { node, inc });
            return;
        }
        let lease = self.etcd.next_lease;
        self.etcd.next_lease += 1;
        self.etcd.leases.insert(lease, (node, self.now + self.t.ttl));
        self.wrote();
        let n = &self.nodes[node as usize];
        let info = MemberInfo {
            name: n.name.clone(),
            zone: Some(format!("z{}", n.zone)),
            nbd: format!("{}:10809", n.name),
            tls: false,
            repl: "127.0.0.1:7000".parse().expect("address"),
            admin: None,
            capacity: self.cfg.capacity,
        };
        let when = [cmp(Key::Alive(node), Field::Version, Ordering::Equal, 0)];
        let ok = self.txn(&when, vec![Put::Member(node, Box::new(info)), Put::Alive(node, lease)]);
        let d = self.d();
        if ok {
            self.at(d, Ev::Registered { node, inc, lease, sent });
        } else {
            // A previous run's lease still holds the alive key: revoke this one, wait, try again.
            self.etcd.leases.remove(&lease);
            self.wrote();
            self.at(d + REGISTER_RETRY_MS, Ev::Register { node, inc });
        }
    }

    fn on_registered(&mut self, node: u32, inc: u32, lease: i64, sent: Ms) {
        if !self.current(node, inc) {
            return;
        }
        if self.cut(node) {
            // The answer is lost: the lease left behind expires, and this node tries again.
            let at = (sent + REQUEST_TIMEOUT_MS).max(self.now);
            self.at(at - self.now, Ev::Register { node, inc });
            return;
        }
        let until = self.standing_end(sent);
        let n = &mut self.nodes[node as usize];
        n.lease = lease;
        n.valid_until = Some(until);
        n.lease_valid.insert(lease, until);
        if n.joined {
            // Registered again after losing its lease: every report reads etcd again (the cache is
            // per lease), which renews solo grants still held and deposes primaries replaced.
            let vols: Vec<u32> = n.copies.iter().copied().collect();
            for v in vols {
                if let Some(i) = self.copy_idx(v, node) {
                    let delay = self.jitter(self.t.heartbeat);
                    self.report_in(v, i, delay);
                }
            }
        } else {
            n.joined = true;
            n.full_reconcile = true;
            self.schedule_reconcile(node, 0);
        }
        self.at(0, Ev::KeepAlive { node, inc, lease });
    }

    fn on_keepalive(&mut self, node: u32, inc: u32, lease: i64) {
        if !self.current(node, inc) || self.nodes[node as usize].lease != lease {
            return;
        }
        if !self.cut(node) {
            let d = self.d();
            let sent = self.now;
            self.at(d, Ev::KeepAliveAtEtcd { node, inc, lease, sent });
        }
        let every = self.t.keepalive_every();
        self.at(every, Ev::KeepAlive { node, inc, lease });
    }

    fn on_keepalive_at_etcd(&mut self, node: u32, inc: u32, lease: i64, sent: Ms) {
        if self.cut(node) {
            return;
        }
        self.sec().keepalives += 1;
        let expiry = self.now + self.t.ttl;
        let ok = match self.etcd.leases.get_mut(&lease) {
            Some(e) => {
                e.1 = expiry;
                true
            }
            None => false,
        };
        let d = self.d();
        self.at(d, Ev::KeepAliveAnswer { node, inc, lease, sent, ok });
    }

    fn on_keepalive_answer(&mut self, node: u32, inc: u32, lease: i64, sent: Ms, ok: bool) {
        if !self.current(node, inc) || self.nodes[node as usize].lease != lease || self.cut(node) {
            return;
        }
        if !ok {
            // etcd expired this node's lease (cut off longer than its TTL): register again.
            let n = &mut self.nodes[node as usize];
            n.valid_until = None;
            n.lease = 0;
            self.at(0, Ev::Register { node, inc });
            return;
        }
        let lapsed = !self.standing_ok(node);
        let until = self.standing_end(sent);
        let n = &mut self.nodes[node as usize];
        n.valid_until = Some(until);
        n.lease_valid.insert(lease, until);
        if lapsed {
            // Solo primaries under this lease acknowledge again.
            let vols: Vec<u32> = n.copies.iter().copied().collect();
            for v in vols {
                self.check(v);
            }
        }
    }

    fn on_reconcile(&mut self, n: u32, inc: u32) {
        if !self.current(n, inc) {
            return;
        }
        self.nodes[n as usize].reconcile_scheduled = false;
        if self.cut(n) {
            // The watch is broken; healing re-reads everything.
            return;
        }
        let now_i = self.instant(self.now);
        let node = &mut self.nodes[n as usize];
        // The first reconcile of this life (after a start) looks at every member and every copy;
        // it is the one that reads the whole prefix (later ones apply what the watch reported).
        let full = std::mem::take(&mut node.full_reconcile);
        if full {
            self.sec().node_reads += 1;
        }
        let node = &mut self.nodes[n as usize];
        let seen = if full { 0 } else { node.alive_cursor };
        node.alive_cursor = self.alive_log.len();
        let changed: Vec<u32> = if full { (0..self.cfg.n_nodes).collect() } else { self.alive_log[seen..].to_vec() };
        let mut ripen = false;
        for x in changed {
            if self.etcd.members[x as usize].is_none() {
                continue;
            }
            let name = self.nodes[x as usize].name.clone();
            let dead_since = &mut self.nodes[n as usize].dead_since;
            if self.etcd.alive[x as usize].is_some() {
                dead_since.remove(&name);
            } else if let Entry::Vacant(e) = dead_since.entry(name) {
                e.insert(now_i);
                ripen = true;
            }
        }
        if ripen {
            // Re-protection looks again once this death has lasted the grace period.
            let delay = self.cfg.grace + self.jitter(REPROTECT_EVERY_MS);
            self.at(delay, Ev::ReprotectTick { node: n, inc });
        }
        let node = &mut self.nodes[n as usize];
        let mut pending = std::mem::take(&mut node.pending);
        if full {
            pending.extend(node.held.iter().copied());
            pending.extend(node.copies.iter().copied());
        }
        node.reprotect_due |= ripen || !pending.is_empty();
        for v in pending {
            self.reconcile_volume(n, v);
        }
        self.reprotect_pass(n);
    }

    /// member.rs `reconcile` for one volume.
    fn reconcile_volume(&mut self, n: u32, v: u32) {
        let listed = self.vols[v as usize].spec_nodes.contains(&n);
        match self.copy_idx(v, n) {
            Some(i) if listed => match self.vols[v as usize].copies[i].run {
                Some(r) => {
                    let peer = self.vols[v as usize].spec_nodes.iter().copied().find(|&x| x != n);
                    if let Some(peer) = peer.filter(|&p| p != r.peer) {
                        self.set_peer(v, i, peer);
                    }
                }
                None => self.start_replica(v, n),
            },
            None if listed => self.start_replica(v, n),
            Some(i) => {
                // Moved away (or moved while this node was gone): stop and remove the copy.
                self.delete_copy(v, i);
                self.touch(v);
            }
            None => {}
        }
    }

    fn reprotect_pass(&mut self, n: u32) {
        if self.bug() == Some(Bug::NoReprotect) || !self.nodes[n as usize].alive || self.cut(n) {
            return;
        }
        if self.nodes[n as usize].replace_busy {
            self.nodes[n as usize].reprotect_due = true;
            return;
        }
        let grace = Duration::from_millis(self.cfg.grace);
        let now_i = self.instant(self.now);
        let last_i = self.instant(self.nodes[n as usize].last_pass);
        let node = &self.nodes[n as usize];
        // plan::overdue is a pure function of this node's volumes and grants, its dead_since and
        // the time: called again only when one of them changed or a death reached the grace period.
        let ripe = |s: &Instant| now_i.saturating_duration_since(*s) >= grace;
        let crossed = node.dead_since.values().any(|s| ripe(s) && *s + grace > last_i);
        if !node.dead_since.values().any(ripe) || !(node.reprotect_due || crossed) {
            return;
        }
        let due: Vec<(u32, u32)> = plan::overdue(&node.snap, &node.name, &node.dead_since, now_i, grace)
            .into_iter()
            .map(|(volume, lost)| (self.vol_by_name[&volume], self.by_name[&lost]))
            .collect();
        let node = &mut self.nodes[n as usize];
        node.reprotect_due = false;
        node.last_pass = self.now;
        node.replacing.extend(due);
        if !node.replacing.is_empty() {
            node.replace_busy = true;
            let inc = node.inc;
            self.at(0, Ev::ReplaceNext { node: n, inc });
        }
    }

    /// Whether `n`'s replica of `v` runs as primary connected to `peer`.
    fn connected(&self, v: u32, n: u32, peer: u32) -> bool {
        self.copy_idx(v, n)
            .and_then(|i| self.vols[v as usize].copies[i].run)
            .is_some_and(|r| r.role == Role::Primary && r.link == Link::Up && r.peer == peer)
    }

    fn replace_failed(&mut self, n: u32) {
        let node = &mut self.nodes[n as usize];
        node.reprotect_due = true;
        let inc = node.inc;
        self.at(REPROTECT_EVERY_MS, Ev::ReprotectTick { node: n, inc });
    }

    fn on_replace_next(&mut self, n: u32, inc: u32) {
        if !self.current(n, inc) {
            return;
        }
        let node = &self.nodes[n as usize];
        if !node.replacing.is_empty() && self.now < node.next_replace_at {
            let wait = node.next_replace_at - self.now;
            return self.at(wait, Ev::ReplaceNext { node: n, inc });
        }
        let Some((vol, lost)) = self.nodes[n as usize].replacing.pop_front() else {
            self.nodes[n as usize].replace_busy = false;
            self.reprotect_pass(n);
            return;
        };
        // Checked when its turn comes, as member.rs does.
        if self.cfg.reprotect_only_disconnected && self.connected(vol, n, lost) {
            return self.at(0, Ev::ReplaceNext { node: n, inc });
        }
        self.nodes[n as usize].next_replace_at = self.now + 1000 / Ms::from(REPROTECT_STARTS_PER_SEC_MAX);
        if self.cut(n) {
            // etcd unreachable: the pass ends, and is tried again a second later.
            let node = &mut self.nodes[n as usize];
            node.replacing.clear();
            node.replace_busy = false;
            self.replace_failed(n);
            return;
        }
        let (d, sent) = (self.d(), self.now);
        self.at(d, Ev::ReplaceRead { node: n, inc, vol, lost, sent });
    }

    /// `Cluster::replace_replica`'s decision. The real one decides from the node's watched copy of
    /// the cluster (and its own moves), so its view lags etcd by the watch's delivery and the 50 ms
    /// gathering; here the decision is made from etcd's state at the moment: a stale view only
    /// fails the real compare-and-swap (the move is tried again on the next pass) or places from
    /// loads a few moves old, as concurrent movers on other nodes already do.
    fn on_replace_read(&mut self, n: u32, inc: u32, vol: u32, lost: u32, sent: Ms) {
        let next = |sim: &mut Sim, delay: Ms| sim.at(delay, Ev::ReplaceNext { node: n, inc });
        if self.cut(n) {
            self.replace_failed(n);
            let at = (sent + REQUEST_TIMEOUT_MS).max(self.now) - self.now;
            return next(self, at);
        }
        let Some((meta, spec)) = self.etcd.volumes[vol as usize].as_ref().map(|(m, s)| (*m, s.clone())) else {
            let d = self.d();
            return next(self, d);
        };
        if self.etcd.alive[lost as usize].is_some() {
            let d = self.d();
            return next(self, d);
        }
        let (lost_name, me) = (&self.nodes[lost as usize].name, &self.nodes[n as usize].name);
        let moved = if self.bug() == Some(Bug::ZoneBlind) {
            let blind: Vec<NodeLoad> = self.loads.iter().map(|l| NodeLoad { zone: None, ..l.clone() }).collect();
            plan::replacement(&blind, &spec, lost_name, me)
        } else {
            plan::replacement(&self.loads, &spec, lost_name, me)
        };
        match moved {
            Ok(Some(moved)) => {
                let new = self.by_name[moved.replicas.last().expect("a new replica")];
                let d = self.d() * 2;
                let grant_rev = self.etcd.meta(Key::Grant(vol)).map_or(0, |m| m.mod_rev);
                let rev = (meta.mod_rev, grant_rev);
                self.at(d, Ev::ReplaceTxn { node: n, inc, vol, lost, new, rev, moved: Box::new(moved), sent });
            }
            Ok(None) => {
                let d = self.d();
                next(self, d);
            }
            Err(_) => {
                // "cannot re-protect yet": the next pass tries again.
                self.replace_failed(n);
                let d = self.d();
                next(self, d);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_replace_txn(
        &mut self,
        n: u32,
        inc: u32,
        vol: u32,
        lost: u32,
        new: u32,
        (rev, grant_rev): (i64, i64),
        moved: VolumeSpec,
        sent: Ms,
    ) {
        if self.cut(n) {
            self.replace_failed(n);
            let at = (sent + REQUEST_TIMEOUT_MS).max(self.now) - self.now;
            self.at(at, Ev::ReplaceNext { node: n, inc });
            return;
        }
        let mut when = vec![
            cmp(Key::Volume(vol), Field::ModRev, Ordering::Equal, rev),
            cmp(Key::Alive(lost), Field::Version, Ordering::Equal, 0),
            cmp(Key::Alive(new), Field::Version, Ordering::Greater, 0),
        ];
        let mut puts = vec![Put::Volume(vol, moved)];
        if self.cfg.solo_on_move {
            if let Some(g) = self.etcd.grant(vol) {
                when.push(cmp(Key::Grant(vol), Field::ModRev, Ordering::Equal, grant_rev));
                puts.push(Put::Grant(vol, GrantDoc { solo: true, ..g.clone() }));
            }
        }
        if self.txn(&when, puts) {
            self.report.reprotections += 1;
        } else {
            self.replace_failed(n);
        }
        let d = self.d();
        self.at(d, Ev::ReplaceNext { node: n, inc });
    }

    // ---- faults ----

    fn resolve(&self, t: Target) -> Option<u32> {
        match t {
            Target::Node(n) => Some(n),
            Target::PrimaryOf(v) => self.vols[v as usize].grant_primary,
            Target::SecondaryOf(v) => {
                let p = self.vols[v as usize].grant_primary?;
                self.vols[v as usize].spec_nodes.iter().copied().find(|&n| n != p)
            }
        }
    }

    fn crash(&mut self, n: u32, silent: bool) {
        if !self.nodes[n as usize].alive {
            return;
        }
        self.n_live -= 1;
        let node = &mut self.nodes[n as usize];
        node.alive = false;
        node.silent = silent;
        node.inc += 1;
        node.joined = false;
        node.lease = 0;
        node.valid_until = None;
        node.lease_valid.clear();
        node.dead_since.clear();
        node.pending.clear();
        node.reconcile_scheduled = false;
        node.reprotect_due = false;
        node.replacing.clear();
        node.replace_busy = false;
        node.copies_in.clear();
        node.copy_gen += 1;
        let copies: Vec<u32> = node.copies.iter().copied().collect();
        let held: Vec<u32> = node.held.iter().copied().collect();
        for &v in &copies {
            if let Some(i) = self.copy_idx(v, n) {
                self.kill_run(v, i);
            }
        }
        for v in copies.into_iter().chain(held) {
            self.touch(v);
        }
    }

    fn restart(&mut self, n: u32) {
        let node = &mut self.nodes[n as usize];
        if node.alive {
            return;
        }
        node.alive = true;
        node.silent = false;
        node.full_reconcile = true;
        node.last_pass = 0;
        let inc = node.inc;
        self.n_live += 1;
        self.at(0, Ev::Register { node: n, inc });
    }

    fn shared(&self, a: u32, b: u32) -> Vec<u32> {
        self.nodes[a as usize].copies.iter().copied().filter(|v| self.nodes[b as usize].copies.contains(v)).collect()
    }

    fn apply_fault(&mut self, f: Fault) {
        self.report.faults += 1;
        let epoch = self.fault_epoch;
        match f {
            Fault::Crash { node, silent, down_ms } => {
                let Some(n) = self.resolve(node) else { return };
                self.crash(n, silent);
                if let Some(ms) = down_ms {
                    self.at(ms, Ev::Heal(Heal::Restart(n), epoch));
                }
            }
            Fault::CutEtcd { node, ms } => {
                let Some(n) = self.resolve(node) else { return };
                self.nodes[n as usize].etcd_cut += 1;
                self.at(ms, Ev::Heal(Heal::Etcd(n), epoch));
            }
            Fault::CutPeers { a, b, ms } => {
                let (Some(a), Some(b)) = (self.resolve(a), self.resolve(b)) else { return };
                if a == b {
                    return;
                }
                *self.nodes[a as usize].peers_cut.entry(b).or_default() += 1;
                *self.nodes[b as usize].peers_cut.entry(a).or_default() += 1;
                for v in self.shared(a, b) {
                    self.touch(v);
                }
                self.at(ms, Ev::Heal(Heal::Peers(a, b), epoch));
            }
            Fault::Isolate { node, ms } => {
                let Some(n) = self.resolve(node) else { return };
                self.nodes[n as usize].isolated += 1;
                let copies: Vec<u32> = self.nodes[n as usize].copies.iter().copied().collect();
                for v in copies {
                    self.touch(v);
                }
                self.at(ms, Ev::Heal(Heal::Isolate(n), epoch));
            }
            Fault::ZoneDown { zone, down_ms } => {
                self.zone_down = Some(zone);
                for n in 0..self.cfg.n_nodes {
                    if self.nodes[n as usize].zone == zone {
                        self.crash(n, true);
                        if let Some(ms) = down_ms {
                            self.at(ms, Ev::Heal(Heal::Restart(n), epoch));
                        }
                    }
                }
            }
            Fault::Force { vol } => {
                let Some(n) = self.resolve(Target::SecondaryOf(vol)) else { return };
                let Some(i) = self.copy_idx(vol, n) else { return };
                if let Some(r) = self.vols[vol as usize].copies[i].run {
                    self.at(0, Ev::Ask { vol, node: n, gen: r.gen, ask: Ask::Force { tries: 0 } });
                }
            }
        }
    }

    fn heal(&mut self, h: Heal, epoch: u32) {
        if epoch != self.fault_epoch {
            return;
        }
        match h {
            Heal::Restart(n) => {
                if self.zone_down.is_some_and(|z| z == self.nodes[n as usize].zone) {
                    // A node of a zone that failed for good stays down with it.
                    return;
                }
                self.restart(n);
            }
            Heal::Etcd(n) => {
                let node = &mut self.nodes[n as usize];
                node.etcd_cut = node.etcd_cut.saturating_sub(1);
                self.etcd_back(n);
            }
            Heal::Peers(a, b) => {
                for (x, y) in [(a, b), (b, a)] {
                    let cut = &mut self.nodes[x as usize].peers_cut;
                    if let Some(k) = cut.get_mut(&y) {
                        *k -= 1;
                        if *k == 0 {
                            cut.remove(&y);
                        }
                    }
                }
                for v in self.shared(a, b) {
                    self.touch(v);
                }
            }
            Heal::Isolate(n) => {
                let node = &mut self.nodes[n as usize];
                node.isolated = node.isolated.saturating_sub(1);
                let copies: Vec<u32> = node.copies.iter().copied().collect();
                for v in copies {
                    self.touch(v);
                }
                self.etcd_back(n);
            }
        }
    }

    /// Reaching etcd again: the watch is set up again and the node re-reads what it missed.
    fn etcd_back(&mut self, n: u32) {
        if !self.cut(n) {
            self.schedule_reconcile(n, WATCH_RESTART_MS);
        }
    }

    fn random_fault(&mut self) -> Option<Fault> {
        let n = self.cfg.n_nodes;
        let node = Target::Node(self.rng.below(n.into()) as u32);
        let down = self.nodes.iter().filter(|x| !x.alive).count() as u32;
        let grace = self.cfg.grace;
        let roll = self.rng.below(100);
        Some(match roll {
            0..=29 if down < (n / 10).max(1) => {
                let silent = self.rng.below(2) == 0;
                // Mostly back within the grace period (an incremental resync); sometimes not (the
                // copies move, and are deleted when it returns).
                let down_ms = if self.rng.below(10) < 7 {
                    1000 + self.rng.below(grace)
                } else {
                    grace + 5000 + self.rng.below(60_000)
                };
                Fault::Crash { node, silent, down_ms: Some(down_ms) }
            }
            0..=49 => Fault::CutEtcd { node, ms: 300 + self.rng.below(4000) },
            50..=64 => {
                let vol = self.rng.below(self.cfg.n_volumes.into()) as u32;
                Fault::CutPeers {
                    a: Target::PrimaryOf(vol),
                    b: Target::SecondaryOf(vol),
                    ms: 500 + self.rng.below(6000),
                }
            }
            65..=79 => Fault::Isolate { node, ms: 500 + self.rng.below(5000) },
            80..=93 => {
                // The operator forces the volume of a node that is gone onto its secondary.
                let gone: Vec<u32> = (0..n)
                    .filter(|&x| self.etcd.alive[x as usize].is_none() && !self.primary_of[x as usize].is_empty())
                    .collect();
                let x = *gone.get(self.rng.below(gone.len() as u64) as usize)?;
                let k = self.rng.below(self.primary_of[x as usize].len() as u64) as usize;
                Fault::Force { vol: *self.primary_of[x as usize].iter().nth(k).expect("non-empty") }
            }
            _ if self.zone_down.is_none() && down == 0 => {
                let zone = self.rng.below(self.cfg.n_zones.into()) as u32;
                let down_ms = if self.rng.below(2) == 0 {
                    5000 + self.rng.below(15_000)
                } else {
                    grace + 10_000 + self.rng.below(30_000)
                };
                // Tracked only while it lasts: a zone that returns is not the measured failure.
                Fault::ZoneDown { zone, down_ms: Some(down_ms) }
            }
            _ => Fault::CutEtcd { node, ms: 300 + self.rng.below(4000) },
        })
    }

    fn on_fault_tick(&mut self) {
        if self.now >= self.faults_until {
            return;
        }
        if let Some(f) = self.random_fault() {
            if let Fault::ZoneDown { .. } = f {
                self.apply_fault(f);
                // The zone's heal restarts its nodes; no zone stays marked as down for good.
                self.zone_down = None;
            } else {
                self.apply_fault(f);
            }
        }
        let every = 60_000 / Ms::from(self.cfg.faults_per_min.max(1));
        let delay = every / 2 + self.jitter(every);
        self.at(delay, Ev::FaultTick);
    }

    /// Every fault ends: crashed nodes restart, partitions heal.
    fn heal_all(&mut self) {
        self.fault_epoch += 1;
        self.zone_down = None;
        for n in 0..self.cfg.n_nodes {
            let node = &mut self.nodes[n as usize];
            node.etcd_cut = 0;
            node.isolated = 0;
            node.peers_cut.clear();
            self.restart(n);
            self.etcd_back(n);
        }
        for v in 0..self.cfg.n_volumes {
            self.touch(v);
        }
    }

    // ---- the event loop and the phases ----

    fn handle(&mut self, ev: Ev) {
        if let Some(v) = self.trace {
            let hit = match &ev {
                Ev::Ask { vol, .. } | Ev::LinkUp { vol, .. } | Ev::Depose { vol, .. } | Ev::ResyncDone { vol, .. } => {
                    *vol == v
                }
                Ev::AuthRead(r) | Ev::AuthTxn(r) | Ev::AuthAnswer(r) => r.vol == v,
                Ev::Fault(_) | Ev::Heal(..) => true,
                _ => false,
            };
            if hit {
                eprintln!("{:>9} {:?}", self.now, ev);
                eprintln!("          {}", self.describe(v));
            }
        }
        match ev {
            Ev::EtcdTick => self.on_etcd_tick(),
            Ev::FaultTick => self.on_fault_tick(),
            Ev::Fault(f) => self.apply_fault(f),
            Ev::Heal(h, epoch) => self.heal(h, epoch),
            Ev::Register { node, inc } => self.on_register(node, inc),
            Ev::RegisterAtEtcd { node, inc, sent } => self.on_register_at_etcd(node, inc, sent),
            Ev::Registered { node, inc, lease, sent } => self.on_registered(node, inc, lease, sent),
            Ev::KeepAlive { node, inc, lease } => self.on_keepalive(node, inc, lease),
            Ev::KeepAliveAtEtcd { node, inc, lease, sent } => self.on_keepalive_at_etcd(node, inc, lease, sent),
            Ev::KeepAliveAnswer { node, inc, lease, sent, ok } => self.on_keepalive_answer(node, inc, lease, sent, ok),
            Ev::Reconcile { node, inc } => self.on_reconcile(node, inc),
            Ev::ReprotectTick { node, inc } => {
                if self.current(node, inc) {
                    self.reprotect_pass(node);
                }
            }
            Ev::ReplaceNext { node, inc } => self.on_replace_next(node, inc),
            Ev::ReplaceRead { node, inc, vol, lost, sent } => self.on_replace_read(node, inc, vol, lost, sent),
            Ev::ReplaceTxn { node, inc, vol, lost, new, rev, moved, sent } => {
                self.on_replace_txn(node, inc, vol, lost, new, rev, *moved, sent)
            }
            Ev::Ask { vol, node, gen, ask } => self.on_ask(vol, node, gen, ask),
            Ev::AuthRead(req) => self.on_auth_read(req),
            Ev::HoldEnd { node } => self.on_hold_end(node),
            Ev::AuthTxn(req) => self.on_auth_txn(req),
            Ev::AuthBatch { node, kind } => self.on_auth_batch(node, kind),
            Ev::AuthAnswer(req) => self.on_auth_answer(req),
            Ev::LinkUp { vol, node, gen, token } => self.on_link_up(vol, node, gen, token),
            Ev::Depose { vol, node, gen } => self.on_depose(vol, node, gen),
            Ev::ResyncDone { vol, node, gen, token } => self.on_resync_done(vol, node, gen, token),
            Ev::CopyCheck { node, gen } => self.on_copy_check(node, gen),
        }
    }

    /// Runs events up to `deadline`, or until `done`. Ok(true) if `done` was reached.
    fn run_until(&mut self, deadline: Ms, done: impl Fn(&Sim) -> bool) -> Result<bool, Failure> {
        loop {
            if done(self) {
                return Ok(true);
            }
            let Some(Reverse(next)) = self.queue.peek() else { return Ok(false) };
            if next.at > deadline {
                self.now = deadline;
                return Ok(false);
            }
            let Reverse(item) = self.queue.pop().expect("peeked");
            self.now = item.at;
            self.report.events += 1;
            self.handle(item.ev);
            if let Some(what) = self.violation.take() {
                return Err(self.failure(what));
            }
        }
    }

    fn failure(&self, what: String) -> Failure {
        Failure { seed: self.cfg.seed, at: self.now, what }
    }

    /// Runs until every volume has two in-sync copies (and, with `clean`, no copy is left where it
    /// moved from), or fails for liveness after `within`.
    fn settle(&mut self, within: Ms, clean: bool, what: &str) -> Result<(), Failure> {
        // Plus what full copies of every volume not in sync would take all through one node:
        // placement sends new replicas to the emptiest node, so one node that came back empty may
        // receive most of them.
        let bytes: u64 = self.vols.iter().filter(|v| !v.healthy).map(|v| v.size).sum();
        let within = within + bytes * 1000 / self.cfg.bandwidth;
        let deadline = self.now + within;
        if self.run_until(deadline, |s| s.all_healthy() && (!clean || s.n_stale == 0))? {
            return Ok(());
        }
        let sick: Vec<String> = (0..self.cfg.n_volumes)
            .filter(|&v| !self.vols[v as usize].healthy)
            .take(3)
            .map(|v| self.describe(v))
            .collect();
        let n_sick = self.vols.len() - self.n_healthy;
        Err(self.failure(format!(
            "liveness ({what}): {n_sick} volumes without two in-sync copies, {} stale copies, after {:.0} s; e.g. {}",
            self.n_stale,
            secs(within),
            sick.join("; ")
        )))
    }

    fn describe(&self, v: u32) -> String {
        let vol = &self.vols[v as usize];
        let spec: Vec<&str> = vol.spec_nodes.iter().map(|&n| self.nodes[n as usize].name.as_str()).collect();
        let grant = self.etcd.grant(v).map_or("no grant".to_string(), |g| {
            format!(
                "grant {} epoch {}{}{}",
                g.primary,
                g.epoch,
                if g.solo { " solo" } else { "" },
                if g.synced { "" } else { " unsynced" }
            )
        });
        let copies: Vec<String> = vol
            .copies
            .iter()
            .map(|c| {
                let n = &self.nodes[c.node as usize];
                let state = match c.run {
                    None => "stopped".to_string(),
                    Some(r) => format!(
                        "{:?} link {:?} upstream {:?} in_sync {} solo {}",
                        r.role, r.link, r.upstream, r.in_sync, r.solo
                    ),
                };
                format!(
                    "{}{}{} e{}{}{} {}",
                    n.name,
                    if n.alive { "" } else { " (down)" },
                    if self.etcd.alive[c.node as usize].is_some() { "" } else { " (no alive key)" },
                    c.epoch,
                    if c.consistent { "" } else { " inconsistent" },
                    if c.behind { " behind" } else { "" },
                    state
                )
            })
            .collect();
        format!("{} on [{}], {grant}: {}", vol.name, spec.join(", "), copies.join(" | "))
    }

    /// Nodes register; volumes are placed and created; every pair syncs.
    fn setup(&mut self) -> Result<(), Failure> {
        for n in 0..self.cfg.n_nodes {
            let delay = self.jitter(200);
            self.at(delay, Ev::Register { node: n, inc: 0 });
        }
        self.at(ETCD_EXPIRY_CHECK_MS, Ev::EtcdTick);
        let all = self.cfg.n_nodes as usize;
        if !self.run_until(10_000, |s| s.etcd.alive.iter().filter(|a| a.is_some()).count() == all)? {
            return Err(self.failure("not every node registered within 10 s".into()));
        }
        self.loads = (0..self.cfg.n_nodes)
            .map(|n| {
                let node = &self.nodes[n as usize];
                NodeLoad {
                    name: node.name.clone(),
                    zone: Some(format!("z{}", node.zone)),
                    alive: true,
                    capacity: self.cfg.capacity,
                    committed: 0,
                    primaries: 0,
                    replicas: 0,
                    incoming: 0,
                }
            })
            .collect();
        for v in 0..self.cfg.n_volumes {
            let size = self.cfg.sizes[self.rng.below(self.cfg.sizes.len() as u64) as usize];
            let replicas =
                placement::place(&self.loads, size, 2).map_err(|e| self.failure(format!("placing volume {v}: {e}")))?;
            let mut when = vec![
                cmp(Key::Volume(v), Field::Version, Ordering::Equal, 0),
                cmp(Key::Volumes, Field::ModRev, Ordering::Less, self.etcd.rev + 1),
            ];
            when.extend(
                replicas.iter().map(|r| cmp(Key::Alive(self.by_name[r]), Field::Version, Ordering::Greater, 0)),
            );
            let spec =
                VolumeSpec { name: self.vols[v as usize].name.clone(), size, replicas, id: self.rng.next_u64() | 1 };
            assert!(self.txn(&when, vec![Put::Volume(v, spec)]), "creating volume {v}");
        }
        let within = self.cfg.settle_ms;
        self.settle(within, true, "after creating the volumes")
    }

    /// Random and scripted faults, then every fault heals and the cluster must converge.
    fn faults(&mut self) -> Result<(), Failure> {
        let t0 = self.now;
        self.bugs_on = true;
        let script_end = self.cfg.script.iter().map(|(t, f)| t + f.lasts()).max().unwrap_or(0);
        if self.cfg.faults_ms == 0 && self.cfg.script.is_empty() {
            return Ok(());
        }
        self.faults_until = t0 + self.cfg.faults_ms;
        if self.cfg.faults_ms > 0 {
            self.at(0, Ev::FaultTick);
        }
        for (t, f) in self.cfg.script.clone() {
            self.at(t, Ev::Fault(f));
        }
        let end = t0 + self.cfg.faults_ms.max(script_end);
        self.run_until(end, |_| false)?;
        self.heal_all();
        self.check_loads();
        let within = self.cfg.settle_ms;
        self.settle(within, true, "after the faults healed")?;
        self.check_loads();
        match self.violation.take() {
            Some(what) => Err(self.failure(what)),
            None => Ok(()),
        }
    }

    /// A whole zone fails for good: the storm is measured, then the time to re-protect everything.
    /// Then the zone returns and must be cleaned up.
    fn zone_failure(&mut self) -> Result<(), Failure> {
        let zone = self.rng.below(self.cfg.n_zones.into()) as u32;
        self.run_until(self.now + 1000, |_| false)?;
        let at = self.now;
        let in_zone = |sim: &Sim, n: u32| sim.nodes[n as usize].zone == zone;
        let volumes_hit = (0..self.cfg.n_volumes)
            .filter(|&v| self.vols[v as usize].spec_nodes.iter().any(|&n| in_zone(self, n)))
            .count() as u32;
        let primaries_hit =
            (0..self.cfg.n_volumes).filter(|&v| self.primary_idx(v).is_some_and(|p| in_zone(self, p))).count() as u32;
        let hit_bytes: u64 = (0..self.cfg.n_volumes)
            .filter(|&v| self.vols[v as usize].spec_nodes.iter().any(|&n| in_zone(self, n)))
            .map(|v| self.vols[v as usize].size)
            .sum();
        let nodes = (0..self.cfg.n_nodes).filter(|&n| in_zone(self, n)).count() as u32;
        let receivers = u64::from(self.cfg.n_nodes - nodes);
        let copy_ideal_ms = hit_bytes * 1000 / (self.cfg.bandwidth * receivers);
        for node in &mut self.nodes {
            node.received = 0;
        }
        self.apply_fault(Fault::ZoneDown { zone, down_ms: None });
        self.zone_watch = Some(ZoneWatch {
            at,
            report: ZoneReport { zone, nodes, volumes_hit, primaries_hit, copy_ideal_ms, ..ZoneReport::default() },
            failovers_before: self.report.failovers,
            reprotections_before: self.report.reprotections,
            copy_bytes_before: self.copy_bytes,
            received_before: 0,
            healthy_at: [None; 4],
        });
        let within = self.cfg.grace + 120_000;
        self.settle(within, false, "re-protecting after a zone failed")?;
        let z = self.zone_watch.take().expect("watching");
        let mut r = z.report;
        r.failovers = self.report.failovers - z.failovers_before;
        r.last_failover_ms = self.last_failover.saturating_sub(at);
        r.reprotections = self.report.reprotections - z.reprotections_before;
        r.copy_bytes = self.copy_bytes - z.copy_bytes_before;
        r.healthy_ms = z.healthy_at.map(|t| t.unwrap_or(self.now - at));
        let window = |from: Ms, len: Ms| {
            let (a, b) = ((from / 1000) as usize, ((from + len) / 1000) as usize);
            self.secs[a.min(self.secs.len())..b.min(self.secs.len())].to_vec()
        };
        let storm = window(at, STORM_MS);
        r.storm_writes_peak = storm.iter().map(|s| s.writes).max().unwrap_or(0);
        r.storm_writes_mean = storm.iter().map(|s| s.writes).sum::<u64>() / storm.len().max(1) as u64;
        r.storm_reads_peak = storm.iter().map(|s| s.reads).max().unwrap_or(0);
        r.storm_watch_events_peak = storm.iter().map(|s| s.watch_events).max().unwrap_or(0);
        r.storm_keepalives_peak = storm.iter().map(|s| s.keepalives).max().unwrap_or(0);
        r.storm_failed_txns = storm.iter().map(|s| s.txn_failed).sum();
        r.storm_node_reads_peak = storm.iter().map(|s| s.node_reads).max().unwrap_or(0);
        let reprotect = window(at + self.cfg.grace, self.now - at);
        r.reprotect_writes_peak = reprotect.iter().map(|s| s.writes).max().unwrap_or(0);
        r.reprotect_node_reads_peak = reprotect.iter().map(|s| s.node_reads).max().unwrap_or(0);
        let busiest = self.nodes.iter().map(|n| n.received).max().unwrap_or(0) - z.received_before;
        r.copy_busiest_ms = busiest * 1000 / self.cfg.bandwidth;
        self.report.zone = Some(r);
        // The zone returns long after the grace period: its copies have moved and must go.
        self.zone_down = None;
        for n in 0..self.cfg.n_nodes {
            if self.nodes[n as usize].zone == zone {
                self.restart(n);
            }
        }
        let within = self.cfg.settle_ms;
        self.settle(within, true, "after the failed zone returned")?;
        self.check_loads();
        match self.violation.take() {
            Some(what) => Err(self.failure(what)),
            None => Ok(()),
        }
    }
}

/// Runs the whole scenario: setup, random and scripted faults, a zone failure, the zone's return.
fn run(cfg: Config) -> Result<Report, Failure> {
    let started = std::time::Instant::now();
    let mut sim = Sim::new(cfg);
    sim.setup()?;
    sim.faults()?;
    if sim.cfg.zone_failure {
        sim.zone_failure()?;
    }
    sim.report.virtual_ms = sim.now;
    let report = sim.report.clone();
    print_report(&sim.cfg, &report, started.elapsed());
    Ok(report)
}

fn print_report(cfg: &Config, r: &Report, wall: Duration) {
    let gib = |b: u64| b as f64 / GIB as f64;
    eprintln!(
        "cluster-sim seed {}: {} nodes in {} zones, {} volumes, grace {} s, {:.1} GiB/s per receiving node: \
         {} events, {:.0} s simulated in {:.1} s",
        r.seed,
        cfg.n_nodes,
        cfg.n_zones,
        cfg.n_volumes,
        cfg.grace / 1000,
        gib(cfg.bandwidth),
        r.events,
        secs(r.virtual_ms),
        wall.as_secs_f64()
    );
    eprintln!(
        "  {} faults; {} failovers, {} forced promotions, {} re-protections, {} full copies, {} resyncs",
        r.faults, r.failovers, r.forced, r.reprotections, r.full_copies, r.resyncs
    );
    if let Some(ms) = r.closest_ms {
        eprintln!("  closest call: a solo primary's standing ended {ms} ms before its successor's grant");
    }
    if let Some(z) = &r.zone {
        eprintln!(
            "  zone z{} fails ({} nodes): {} volumes lose a replica, {} of them their primary",
            z.zone, z.nodes, z.volumes_hit, z.primaries_hit
        );
        eprintln!(
            "    storm (first {} s): etcd writes/s peak {}, mean {}; reads/s peak {}; {} failovers, the last {:.2} s \
             after the failure",
            STORM_MS / 1000,
            z.storm_writes_peak,
            z.storm_writes_mean,
            z.storm_reads_peak,
            z.failovers,
            secs(z.last_failover_ms)
        );
        eprintln!(
            "    also: keep-alives/s peak {}, {} compare-and-swaps lost, whole-prefix reads/s by nodes peak {}",
            z.storm_keepalives_peak, z.storm_failed_txns, z.storm_node_reads_peak
        );
        eprintln!(
            "    watch notifications to the nodes (each applies them; no whole-prefix read per change): {:.2e}/s at \
             the peak",
            z.storm_watch_events_peak as f64
        );
        eprintln!(
            "    re-protection: {} replicas moved ({} a second per node at most), etcd writes/s peak {}, whole-prefix \
             reads/s peak {}; {:.0} GiB copied, the busiest receiver alone needing {:.0} s",
            z.reprotections,
            REPROTECT_STARTS_PER_SEC_MAX,
            z.reprotect_writes_peak,
            z.reprotect_node_reads_peak,
            gib(z.copy_bytes),
            secs(z.copy_busiest_ms)
        );
        eprintln!(
            "    two in-sync copies again: 50% after {:.0} s, 90% {:.0} s, 99% {:.0} s, all {:.0} s (grace {} s + \
             ideal copy time {:.0} s)",
            secs(z.healthy_ms[0]),
            secs(z.healthy_ms[1]),
            secs(z.healthy_ms[2]),
            secs(z.healthy_ms[3]),
            cfg.grace / 1000,
            secs(z.copy_ideal_ms)
        );
    }
}

// ---- tests --------------------------------------------------------------------------------------

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|s| s.parse().unwrap_or_else(|_| panic!("{name}={s}: not a number")))
}

/// The seeds to run: `CLUSTER_SIM_SEED` alone, or `CLUSTER_SIM_SEEDS` of them (default `n`).
fn seeds(n: u64) -> Vec<u64> {
    match env_u64("CLUSTER_SIM_SEED") {
        Some(seed) => vec![seed],
        None => (1..=env_u64("CLUSTER_SIM_SEEDS").unwrap_or(n)).collect(),
    }
}

fn check(cfg: Config) -> Report {
    run(cfg).unwrap_or_else(|f| panic!("{f}"))
}

#[test]
fn random_faults_and_a_zone_failure_keep_every_invariant() {
    for seed in seeds(8) {
        let r = check(Config::ci(seed));
        assert!(r.faults > 20, "seed {seed}: only {} faults", r.faults);
        let z = r.zone.expect("a zone failed");
        assert_eq!(z.reprotections, z.volumes_hit, "seed {seed}: every replica in the zone moves once");
        assert!(z.failovers >= z.primaries_hit, "seed {seed}: every primary in the zone fails over");
    }
}

#[test]
fn a_seed_replays_exactly() {
    let cfg = Config { n_volumes: 500, faults_ms: 60_000, ..Config::ci(7) };
    // Everything a run reports, from event counts to the times of the last failover.
    assert_eq!(format!("{:?}", check(cfg.clone())), format!("{:?}", check(cfg)));
}

#[test]
fn a_zone_failure_is_measured() {
    let r = check(Config { faults_ms: 0, ..Config::ci(11) });
    let z = r.zone.expect("a zone failed");
    assert_eq!(z.failovers, z.primaries_hit, "each volume whose primary was in the zone fails over once");
    assert_eq!(z.reprotections, z.volumes_hit);
    // Failover: the lease's TTL, etcd's expiry check, a retry pause and a few round trips.
    assert!(z.last_failover_ms <= 2500, "the last failover took {} ms", z.last_failover_ms);
    assert!(z.storm_writes_peak > 0 && z.storm_writes_mean > 0);
    // Nothing is back before the grace period, nor faster than the copies can go.
    assert!(z.healthy_ms[0] >= 30_000);
    assert!(z.healthy_ms[3] >= 30_000 + z.copy_ideal_ms.max(z.copy_busiest_ms));
}

/// The primary of the only volume loses its peer and acknowledges alone; then it is cut off from
/// etcd too, and an operator forces its secondary into service as soon as etcd lets it.
fn solo_then_cut_off() -> Vec<(Ms, Fault)> {
    let (p, s) = (Target::PrimaryOf(0), Target::SecondaryOf(0));
    vec![
        (1000, Fault::CutPeers { a: p, b: s, ms: 20_000 }),
        (5000, Fault::CutEtcd { node: p, ms: 15_000 }),
        (5000, Fault::Force { vol: 0 }),
    ]
}

#[test]
fn a_solo_primary_stops_before_a_forced_takeover() {
    let r = check(Config::tiny(solo_then_cut_off(), None));
    assert_eq!(r.forced, 1);
    // The takeover came as soon as etcd allowed it: after the old primary's standing ended, by at
    // most the standing's margin (a third of the TTL), etcd's expiry check (500 ms), the
    // operator's retry pause (200 ms) and a few round trips.
    let margin = r.closest_ms.expect("a takeover from a running solo primary");
    assert!((0..=333 + 500 + 200 + 50).contains(&margin), "margin {margin} ms");
}

#[test]
fn a_solo_primary_outliving_its_lease_is_caught() {
    let f = run(Config::tiny(solo_then_cut_off(), Some(Bug::SoloOutlivesLease))).expect_err("caught");
    assert!(f.what.contains("two primaries acknowledging writes"), "{f}");
}

#[test]
fn promoting_a_copy_that_lacks_acknowledged_writes_is_caught() {
    // Without the operator: the secondary's watcher forces the takeover by itself.
    let mut script = solo_then_cut_off();
    script.pop();
    let f = run(Config::tiny(script.clone(), Some(Bug::EagerForce))).expect_err("caught");
    assert!(f.what.contains("lacking writes a primary acknowledged"), "{f}");
    check(Config::tiny(script, None));
}

/// The only volume's secondary is cut off from etcd, not from its primary, past the grace period:
/// its replica moves while the pair is in sync, so the record is not solo. The primary dies during
/// the new replica's full copy (4 GiB at 100 MiB/s: staged, so the copy leaves the replica
/// "consistent", with nothing committed in it).
fn moved_while_in_sync_then_the_primary_dies(solo_on_move: bool, reprotect_only_disconnected: bool) -> Config {
    let script = vec![
        (1000, Fault::CutEtcd { node: Target::SecondaryOf(0), ms: 40_000 }),
        (45_000, Fault::Crash { node: Target::PrimaryOf(0), silent: false, down_ms: Some(20_000) }),
    ];
    Config {
        sizes: vec![4 * GIB],
        bandwidth: 100 << 20,
        solo_on_move,
        reprotect_only_disconnected,
        promote_only_listed: false,
        ..Config::tiny(script, None)
    }
}

/// A bug re-protection had (fixed: both fixes below are in the code), found by the random runs (`CLUSTER_SIM_FAULTS_PER_MIN=300
/// CLUSTER_SIM_SEED=47`, and 134, 165, 167, 169): the empty new replica is promoted, and every write the volume ever had is lost. With either fix proposed the volume
/// waits for its primary instead: the record solo from the move (`solo_on_move`), or no move of a
/// replica still connected to its primary (`reprotect_only_disconnected`).
#[test]
fn re_protection_can_promote_an_empty_replica() {
    let f = run(moved_while_in_sync_then_the_primary_dies(false, false)).expect_err("the loss is caught");
    assert!(f.what.contains("lacking writes a primary acknowledged"), "{f}");
    let r = check(moved_while_in_sync_then_the_primary_dies(true, false));
    assert_eq!((r.reprotections, r.failovers), (1, 0));
    // Not moved: when the primary dies, its in-sync secondary takes over.
    let r = check(moved_while_in_sync_then_the_primary_dies(false, true));
    assert_eq!((r.reprotections, r.failovers), (0, 1));
}

/// The only volume's secondary is cut off from etcd past the grace period and moves (its new
/// replica copies 1 GiB in a second and is in sync); then the primary and the new replica die
/// together. The moved-away replica, still running, reaches etcd again: between its new lease and
/// its first reconcile (half a second) it asks to be promoted, lacking what the pair wrote since.
fn moved_away_then_both_others_die(seed: u64, promote_only_listed: bool) -> Config {
    let script = vec![
        (1000, Fault::CutEtcd { node: Target::SecondaryOf(0), ms: 40_000 }),
        (38_000, Fault::Crash { node: Target::PrimaryOf(0), silent: false, down_ms: Some(60_000) }),
        (38_000, Fault::Crash { node: Target::SecondaryOf(0), silent: false, down_ms: Some(60_000) }),
    ];
    Config {
        seed,
        sizes: vec![GIB],
        solo_on_move: true,
        reprotect_only_disconnected: false,
        promote_only_listed,
        ..Config::tiny(script, None)
    }
}

/// A bug the etcd authority had (fixed: `promote_only_listed` is in the code), found by the random
/// runs at 300 faults a minute
/// (`CLUSTER_SIM_FAULTS_PER_MIN=300 CLUSTER_SIM_SEED=36`): it promotes a node the volume no longer
/// lists, which then deletes its copy at its next reconcile. With `promote_only_listed` it cannot.
#[test]
fn a_replica_moved_away_can_be_promoted() {
    let caught = (1..=20)
        .filter_map(|seed| run(moved_away_then_both_others_die(seed, false)).err())
        .inspect(|f| assert!(f.what.contains("lacking writes a primary acknowledged"), "{f}"))
        .count();
    assert!(caught > 0, "no seed of 20 promoted the moved-away replica");
    for seed in 1..=20 {
        check(moved_away_then_both_others_die(seed, true));
    }
}

#[test]
fn a_replica_moved_into_the_survivors_zone_is_caught() {
    let cfg = Config { n_volumes: 300, faults_ms: 0, bug: Some(Bug::ZoneBlind), ..Config::ci(3) };
    let f = run(cfg).expect_err("caught");
    assert!(f.what.contains("share zone"), "{f}");
}

#[test]
fn volumes_never_re_protected_are_caught() {
    let cfg = Config { n_volumes: 300, faults_ms: 0, bug: Some(Bug::NoReprotect), ..Config::ci(3) };
    let f = run(cfg).expect_err("caught");
    assert!(f.what.starts_with("liveness"), "{f}");
}

/// A tenth of the issue's scale in CI. `CLUSTER_SIM_FULL=1` (benches/cluster-sim.sh, in release)
/// runs the full scale with random faults first; `CLUSTER_SIM_NODES`, `CLUSTER_SIM_VOLUMES`,
/// `CLUSTER_SIM_FAULTS_S` and `CLUSTER_SIM_BANDWIDTH_MIB` change it.
#[test]
fn a_zone_failure_at_scale() {
    let full = env_u64("CLUSTER_SIM_FULL").is_some_and(|f| f != 0);
    for seed in seeds(1) {
        let mut cfg = if full {
            Config::full(seed)
        } else {
            Config { n_nodes: 100, n_volumes: 10_000, faults_ms: 0, ..Config::ci(seed) }
        };
        cfg.n_nodes = env_u64("CLUSTER_SIM_NODES").map_or(cfg.n_nodes, |n| n as u32);
        cfg.n_volumes = env_u64("CLUSTER_SIM_VOLUMES").map_or(cfg.n_volumes, |n| n as u32);
        cfg.faults_ms = env_u64("CLUSTER_SIM_FAULTS_S").map_or(cfg.faults_ms, |s| s * 1000);
        cfg.bandwidth = env_u64("CLUSTER_SIM_BANDWIDTH_MIB").map_or(cfg.bandwidth, |m| m << 20);
        let r = check(cfg);
        let z = r.zone.expect("a zone failed");
        assert_eq!(z.reprotections, z.volumes_hit);
        assert_eq!(z.failovers, z.primaries_hit);
    }
}
