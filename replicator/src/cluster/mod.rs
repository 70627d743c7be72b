//! Cluster mode: many volumes on many nodes, with etcd as the authority.
//!
//! A node (`syncblock node`) runs one store and joins the cluster: it records itself under
//! `members/NAME` (its addresses, zone and capacity; kept after it dies, so `node list` can say it
//! is down) and proves it is alive with `alive/NAME`, a key bound to an etcd lease it keeps alive
//! (`member.rs`). `volume create` places a volume's two replicas with [`placement`] and writes
//! `volumes/NAME`; every node watches `volumes/` and runs a replicator [`crate::Node`] for each
//! volume it holds a replica of, the first listed as primary. `grants/NAME` is the volume's
//! authority record (epoch, primary, solo), changed only by compare-and-swap transactions in
//! [`authority::Etcd`], which applies the witness's rules. docs/cluster.md lists every key and
//! argues why no volume ever has two primaries acknowledging writes.

pub mod authority;
pub mod batch;
mod channel;
pub mod member;
pub mod mux;
pub mod placement;
pub mod plan;
pub mod router;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Every key lives under this prefix (so an etcd cluster can be shared with other users).
pub const DEFAULT_PREFIX: &str = "/syncblock";

/// How long an etcd request may take before the caller hears "unreachable": 5 s, longer than an
/// etcd leader election (1 s by default) so that losing one member of three never fails a
/// request, and short enough that a command against a dead etcd fails while the operator waits.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Every connection to an etcd member is pinged this often (HTTP/2 PING), and closed if the ping
/// is not answered within [`KEEPALIVE_WAIT`]: a member that hangs with its connections open
/// (stopped, or cut off without a reset) then fails the watch and the requests on it within
/// 1.5 s, and they are made again through the others. etcd answers pings in its transport,
/// whatever its load; two small frames a second per member is nothing to it.
const KEEPALIVE_EVERY: Duration = Duration::from_millis(500);
const KEEPALIVE_WAIT: Duration = Duration::from_secs(1);

/// How long a (re)connection waits for an endpoint's status when none has answered yet.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a (re)connection waits for the other endpoints once one has answered: a live member
/// answers a status request in milliseconds, and a node reconnecting because a keep-alive went
/// unanswered may have under half a second of its lease left (see `member::keep_alive`).
pub(crate) const PROBE_GRACE: Duration = Duration::from_millis(100);

/// Longest volume or node name: names are etcd keys, NBD export names and log fields.
pub const NAME_BYTES_MAX: usize = 64;

/// A node as recorded in `members/NAME`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Where NBD clients reach it (`host:port`).
    pub nbd: String,
    /// Its NBD listener requires TLS: clients reach it at `nbds://`. (Absent in records written
    /// before it existed: plaintext.)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls: bool,
    /// Its replication listener (one per node, shared by all its volumes).
    pub repl: SocketAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<SocketAddr>,
    /// Bytes of volume data its store can hold.
    pub capacity: u64,
}

impl MemberInfo {
    /// The node's NBD server as a URI without an export: `nbd://host:port`, or `nbds://` if it
    /// requires TLS.
    pub fn uri(&self) -> String {
        format!("{}://{}", if self.tls { "nbds" } else { "nbd" }, self.nbd)
    }
}

/// A volume as recorded in `volumes/NAME`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    pub name: String,
    pub size: u64,
    /// The nodes holding a replica; the first was its first primary.
    pub replicas: Vec<String>,
    /// The pair id (`ReplState::pair`): a replica left over from a deleted volume of the same name
    /// carries another and is never mistaken for this one.
    pub id: u64,
}

/// A volume's authority record, `grants/NAME`: the witness's record for a pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantDoc {
    pub pair: u64,
    pub epoch: u64,
    pub primary: String,
    pub solo: bool,
    pub synced: bool,
}

/// Why a cluster operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("etcd at {endpoints}: {source} (is etcd running there, and reachable from this host?)")]
    Unreachable { endpoints: String, source: etcd_client::Error },
    /// The request conflicts with the cluster's state; nothing was changed.
    #[error("{0}")]
    Refused(String),
    #[error("etcd holds a malformed value at {key}: {why}")]
    Corrupt { key: String, why: String },
}

pub type Result<T, E = ClusterError> = std::result::Result<T, E>;

/// A JSON value read from etcd at `key`.
pub(crate) fn decode<T: DeserializeOwned>(key: &str, value: &[u8]) -> Result<T> {
    serde_json::from_slice(value).map_err(|e| ClusterError::Corrupt { key: key.to_string(), why: e.to_string() })
}

/// A name usable as a key, an export name and a log field.
pub fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= NAME_BYTES_MAX
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(ClusterError::Refused(format!(
            "{what} name {name:?}: use 1 to {NAME_BYTES_MAX} letters, digits, '.', '_' or '-', not starting with '.'"
        )))
    }
}

/// A connection to the cluster's etcd. Cheap to clone (the gRPC channel is shared).
#[derive(Clone)]
pub struct Cluster {
    /// Replaced by [`Cluster::reconnect`] (clones share it).
    client: std::sync::Arc<std::sync::RwLock<Client>>,
    prefix: String,
    /// As given (for messages), and one URL each.
    endpoints: String,
    list: Vec<String>,
    tls: Option<EtcdTls>,
}

/// TLS to etcd (its `--trusted-ca-file`, and with `--client-cert-auth` a client certificate):
/// PEM files. The endpoints are then `https://` URLs.
#[derive(Debug, Clone, Default)]
pub struct EtcdTls {
    pub ca: Option<std::path::PathBuf>,
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
}

impl EtcdTls {
    /// The TLS side of a connection to etcd: its CA, this client's certificate, and HTTP/2 by
    /// ALPN (gRPC needs it). A new one per client: OpenSSL's builder is used up by each.
    fn ssl(&self) -> Result<openssl::ssl::SslConnectorBuilder> {
        let read = |p: &std::path::PathBuf| {
            std::fs::read(p).map_err(|e| ClusterError::Refused(format!("etcd TLS file {}: {e}", p.display())))
        };
        let bad = |what: &str, e: openssl::error::ErrorStack| ClusterError::Refused(format!("etcd TLS {what}: {e}"));
        let mut b =
            openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls_client()).map_err(|e| bad("setup", e))?;
        b.set_alpn_protos(b"\x02h2").map_err(|e| bad("setup", e))?;
        if let Some(ca) = &self.ca {
            for cert in openssl::x509::X509::stack_from_pem(&read(ca)?).map_err(|e| bad("CA", e))? {
                b.cert_store_mut().add_cert(cert).map_err(|e| bad("CA", e))?;
            }
        }
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => {
                let cert = openssl::x509::X509::from_pem(&read(c)?).map_err(|e| bad("certificate", e))?;
                let key = openssl::pkey::PKey::private_key_from_pem(&read(k)?).map_err(|e| bad("key", e))?;
                b.set_certificate(&cert).map_err(|e| bad("certificate", e))?;
                b.set_private_key(&key).map_err(|e| bad("key", e))?;
            }
            (None, None) => {}
            _ => return Err(ClusterError::Refused("--etcd-cert and --etcd-key go together".into())),
        }
        Ok(b)
    }
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("endpoints", &self.endpoints).finish_non_exhaustive()
    }
}

/// What `volume list` shows for one volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VolumeView {
    pub name: String,
    pub size: u64,
    /// The node serving it now (the grant's primary; the placement's first before its first grant).
    pub primary: String,
    pub secondary: Option<String>,
    /// `in-sync`, `degraded` (the primary acknowledges alone), `new` (never synced yet), or
    /// `down` (its primary's node is not alive).
    pub state: String,
    pub epoch: u64,
    /// Where to connect: `nbd://HOST:PORT/NAME` on its primary.
    pub nbd: String,
}

/// What `node list` shows for one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeView {
    pub name: String,
    pub zone: Option<String>,
    pub alive: bool,
    pub volumes: u32,
    pub primaries: u32,
    pub capacity: u64,
    /// Capacity not yet promised to a volume (volumes are thin, but placed as if full).
    pub free: u64,
    pub nbd: String,
}

/// A snapshot of everything in the cluster, read at one etcd revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub revision: i64,
    pub members: BTreeMap<String, MemberInfo>,
    pub alive: BTreeMap<String, i64>,
    pub volumes: BTreeMap<String, VolumeSpec>,
    pub grants: BTreeMap<String, GrantDoc>,
    /// Nodes an operator removed (`removed/NAME`, by `syncblock node remove`) that have not
    /// registered again: their replicas are re-protected without waiting for the grace period.
    pub removed: std::collections::BTreeSet<String>,
    /// Each key's mod revision (by the key's path under the prefix, e.g. `volumes/NAME`), for the
    /// compare-and-swap transactions made from this snapshot.
    pub revisions: BTreeMap<String, i64>,
}

/// What a key under the cluster's prefix holds (the table in docs/cluster.md), and whose it is.
enum KeyOf<'a> {
    Member(&'a str),
    Alive(&'a str),
    Volume(&'a str),
    Grant(&'a str),
    Removed(&'a str),
    Other,
}

impl<'a> KeyOf<'a> {
    /// `rest`: the key without the prefix, e.g. `volumes/db`.
    fn parse(rest: &'a str) -> KeyOf<'a> {
        match rest.split_once('/') {
            Some(("members", name)) => KeyOf::Member(name),
            Some(("alive", name)) => KeyOf::Alive(name),
            Some(("volumes", name)) => KeyOf::Volume(name),
            Some(("grants", name)) => KeyOf::Grant(name),
            Some(("removed", name)) => KeyOf::Removed(name),
            _ => KeyOf::Other,
        }
    }
}

impl Snapshot {
    /// Records `key` (under `base`, the cluster's prefix) as holding `value`, as read or as a watch
    /// reported it written at `revision`.
    pub fn put(&mut self, base: &str, key: &[u8], value: &[u8], lease: i64, revision: i64) -> Result<()> {
        let key = String::from_utf8_lossy(key);
        let Some(rest) = key.strip_prefix(base) else { return Ok(()) };
        match KeyOf::parse(rest) {
            KeyOf::Member(name) => {
                self.members.insert(name.into(), decode(&key, value)?);
            }
            KeyOf::Alive(name) => {
                self.alive.insert(name.into(), lease);
            }
            KeyOf::Volume(name) => {
                self.volumes.insert(name.into(), decode(&key, value)?);
            }
            KeyOf::Grant(name) => {
                self.grants.insert(name.into(), decode(&key, value)?);
            }
            KeyOf::Removed(name) => {
                self.removed.insert(name.into());
            }
            KeyOf::Other => {}
        }
        self.revisions.insert(rest.to_string(), revision);
        self.revision = self.revision.max(revision);
        Ok(())
    }

    /// Records `key` as deleted at `revision`.
    pub fn delete(&mut self, base: &str, key: &[u8], revision: i64) {
        let key = String::from_utf8_lossy(key);
        let Some(rest) = key.strip_prefix(base) else { return };
        match KeyOf::parse(rest) {
            KeyOf::Member(name) => {
                self.members.remove(name);
            }
            KeyOf::Alive(name) => {
                self.alive.remove(name);
            }
            KeyOf::Volume(name) => {
                self.volumes.remove(name);
            }
            KeyOf::Grant(name) => {
                self.grants.remove(name);
            }
            KeyOf::Removed(name) => {
                self.removed.remove(name);
            }
            KeyOf::Other => {}
        }
        self.revisions.remove(rest);
        self.revision = self.revision.max(revision);
    }

    /// Placement's view of every member: one pass over the volumes.
    pub fn loads(&self) -> Vec<placement::NodeLoad> {
        // (committed bytes, replicas, primaries, incoming bytes) by node.
        let mut by: BTreeMap<&str, (u64, u32, u32, u64)> = BTreeMap::new();
        for v in self.volumes.values() {
            let primary = self.primary_of(v);
            let copying = self.grants.get(&v.name).is_some_and(|g| g.pair == v.id && g.solo);
            for r in &v.replicas {
                let e = by.entry(r).or_default();
                e.0 = e.0.saturating_add(v.size);
                e.1 += 1;
                if copying && r != primary {
                    e.3 = e.3.saturating_add(v.size);
                }
            }
            by.entry(primary).or_default().2 += 1;
        }
        self.members
            .values()
            .map(|m| {
                let (committed, replicas, primaries, incoming) = by.get(m.name.as_str()).copied().unwrap_or_default();
                placement::NodeLoad {
                    name: m.name.clone(),
                    zone: m.zone.clone(),
                    alive: self.alive.contains_key(&m.name),
                    capacity: m.capacity,
                    committed,
                    primaries,
                    replicas,
                    incoming,
                }
            })
            .collect()
    }

    /// The node that is (or, before the first grant, will be) the volume's primary.
    pub fn primary_of<'a>(&'a self, v: &'a VolumeSpec) -> &'a str {
        match self.grants.get(&v.name) {
            Some(g) if g.pair == v.id => &g.primary,
            _ => v.replicas.first().map_or("", String::as_str),
        }
    }

    pub fn volume_views(&self) -> Vec<VolumeView> {
        self.volumes
            .values()
            .map(|v| {
                let primary = self.primary_of(v).to_string();
                let grant = self.grants.get(&v.name).filter(|g| g.pair == v.id);
                let state = if !self.alive.contains_key(&primary) {
                    "down"
                } else {
                    match grant {
                        None => "new",
                        Some(g) if !g.synced => "new",
                        Some(g) if g.solo => "degraded",
                        Some(_) => "in-sync",
                    }
                };
                let nbd = self.members.get(&primary).map_or(String::new(), |m| format!("{}/{}", m.uri(), v.name));
                VolumeView {
                    name: v.name.clone(),
                    size: v.size,
                    secondary: v.replicas.iter().find(|r| **r != primary).cloned(),
                    primary,
                    state: state.into(),
                    epoch: grant.map_or(0, |g| g.epoch),
                    nbd,
                }
            })
            .collect()
    }

    pub fn node_views(&self) -> Vec<NodeView> {
        self.loads()
            .into_iter()
            .map(|l| NodeView {
                nbd: self.members.get(&l.name).map_or(String::new(), |m| m.nbd.clone()),
                name: l.name,
                zone: l.zone,
                alive: l.alive,
                volumes: l.replicas,
                primaries: l.primaries,
                capacity: l.capacity,
                free: l.capacity.saturating_sub(l.committed),
            })
            .collect()
    }
}

/// A client of `endpoints`, over [`channel::NoDelay`]: with `ssl`, over TLS.
async fn client<E: AsRef<str>>(
    endpoints: &[E],
    options: ConnectOptions,
    ssl: Option<openssl::ssl::SslConnectorBuilder>,
) -> std::result::Result<Client, etcd_client::Error> {
    Client::connect_with_balanced_channel(endpoints, Some(options), channel::NoDelay(ssl)).await
}

/// A volume size: a positive multiple of the block size.
fn check_size(size: u64) -> Result<()> {
    let block = syncblock_engine::BLOCK_BYTES_U64;
    if size == 0 || size % block != 0 {
        return Err(ClusterError::Refused(format!("size {size}: must be a positive multiple of {block} bytes")));
    }
    Ok(())
}

impl Cluster {
    /// Connects to etcd at `endpoints` (comma-separated URLs, e.g. `http://127.0.0.1:2379`), over
    /// TLS when `tls` is given; the client fails over between them. Checks that etcd answers.
    pub async fn connect(endpoints: &str, tls: Option<EtcdTls>) -> Result<Cluster> {
        Self::open(endpoints, DEFAULT_PREFIX, tls).await
    }

    async fn open(endpoints: &str, prefix: &str, tls: Option<EtcdTls>) -> Result<Cluster> {
        let list: Vec<String> = endpoints.split(',').map(|e| e.trim().to_string()).filter(|e| !e.is_empty()).collect();
        if list.is_empty() {
            return Err(ClusterError::Refused("--etcd names no endpoint".into()));
        }
        let client = Self::connect_live(endpoints, &list, tls.as_ref()).await?;
        Ok(Cluster {
            client: std::sync::Arc::new(std::sync::RwLock::new(client)),
            prefix: prefix.trim_end_matches('/').to_string(),
            endpoints: endpoints.into(),
            list,
            tls,
        })
    }

    /// A client over the endpoints that answer now. The client's balancing sends a request to an
    /// endpoint it has never reached and fails it there, rather than trying another, so a member
    /// that is down when a command starts (one of three lost) would fail every other command;
    /// probing each first leaves it out.
    async fn connect_live(endpoints: &str, list: &[String], tls: Option<&EtcdTls>) -> Result<Client> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(KEEPALIVE_EVERY, KEEPALIVE_WAIT);
        let ssl = || tls.map(EtcdTls::ssl).transpose();
        // Bad TLS files are refused as such, before any endpoint is tried.
        ssl()?;
        let probe = |e: String| {
            let options = options.clone();
            let ssl = ssl();
            async move {
                let r = async {
                    let ssl = ssl.map_err(|e| etcd_client::Error::InvalidArgs(e.to_string()))?;
                    let mut c = client(&[e.as_str()], options, ssl).await?;
                    c.status().await
                }
                .await;
                (e, r)
            }
        };
        // Every endpoint at once. Once one has answered, the others get PROBE_GRACE more: a member
        // that is alive answers in milliseconds, and one that hangs (stopped, or cut off without a
        // reset) must not hold up a node whose lease has a second left.
        let mut probes: futures_util::stream::FuturesUnordered<_> = list.iter().cloned().map(probe).collect();
        let mut live = Vec::new();
        let mut failures = Vec::new();
        let mut failed = Vec::new();
        let mut until = tokio::time::Instant::now() + PROBE_TIMEOUT;
        loop {
            match tokio::time::timeout_at(until, futures_util::StreamExt::next(&mut probes)).await {
                Ok(Some((e, Ok(_)))) => {
                    if live.is_empty() {
                        until = until.min(tokio::time::Instant::now() + PROBE_GRACE);
                    }
                    live.push(e);
                }
                Ok(Some((e, Err(err)))) => {
                    failures.push(format!("{e}: {err}"));
                    failed.push(e);
                }
                Ok(None) => break,
                Err(_) => {
                    let waited = if live.is_empty() { PROBE_TIMEOUT } else { PROBE_GRACE };
                    let silent = list.iter().filter(|e| !live.contains(*e) && !failed.contains(*e));
                    failures.extend(silent.map(|e| format!("{e}: no answer within {waited:?}")));
                    break;
                }
            }
        }
        if live.is_empty() {
            return Err(ClusterError::Unreachable {
                endpoints: endpoints.to_string(),
                source: etcd_client::Error::InvalidArgs(failures.join("; ")),
            });
        }
        if !failures.is_empty() {
            tracing::warn!("etcd endpoints not answering (left out for now): {}", failures.join("; "));
        }
        client(&live, options, ssl()?)
            .await
            .map_err(|source| ClusterError::Unreachable { endpoints: endpoints.to_string(), source })
    }

    /// Another connection to the same cluster, not shared with this one (for a thread of its own).
    pub async fn separate(&self) -> Result<Cluster> {
        Self::open(&self.endpoints, &self.prefix, self.tls.clone()).await
    }

    /// Connects again to the endpoints that answer now (after requests kept failing: the members
    /// this client used may be the ones lost).
    pub async fn reconnect(&self) -> Result<()> {
        let client = Self::connect_live(&self.endpoints, &self.list, self.tls.as_ref()).await?;
        *self.client.write().expect("client") = client;
        Ok(())
    }

    pub fn key(&self, rest: &str) -> String {
        format!("{}/{rest}", self.prefix)
    }

    pub(crate) fn err(&self, source: etcd_client::Error) -> ClusterError {
        ClusterError::Unreachable { endpoints: self.endpoints.clone(), source }
    }

    pub(crate) fn client(&self) -> Client {
        self.client.read().expect("client").clone()
    }

    /// Everything, at one revision.
    pub async fn snapshot(&self) -> Result<Snapshot> {
        match self.read_snapshot().await {
            // A read that failed in transport (a member lost since this client connected, or a
            // connection its server closed) is made once more, over a fresh connection to the
            // members that answer now. Once, in a three-member test with one member lost, a
            // `volume list` failed with a broken pipe on a live member's connection.
            Err(ClusterError::Unreachable { .. }) => {
                if let Err(e) = self.reconnect().await {
                    tracing::debug!("reconnecting to etcd after a failed read: {e}");
                }
                self.read_snapshot().await
            }
            r => r,
        }
    }

    async fn read_snapshot(&self) -> Result<Snapshot> {
        let mut kv = self.client().kv_client();
        let resp = kv.get(self.key(""), Some(GetOptions::new().with_prefix())).await.map_err(|e| self.err(e))?;
        let mut s = Snapshot { revision: resp.header().map_or(0, |h| h.revision()), ..Snapshot::default() };
        let base = self.key("");
        for kv in resp.kvs() {
            s.put(&base, kv.key(), kv.value(), kv.lease(), kv.mod_revision())?;
        }
        Ok(s)
    }

    /// Brings `snap` up to date with one watch response's events, in order, so that a watching
    /// node need not read the whole prefix again after every change: at 1,000 nodes that read was
    /// 2,000 whole-prefix reads a second in a failover storm (the control-plane simulation). An
    /// error (a record that does not decode) leaves `snap` partly updated: read it again.
    pub fn apply(&self, snap: &mut Snapshot, resp: &etcd_client::WatchResponse) -> Result<()> {
        let base = self.key("");
        for e in resp.events() {
            let Some(kv) = e.kv() else { continue };
            match e.event_type() {
                etcd_client::EventType::Put => snap.put(&base, kv.key(), kv.value(), kv.lease(), kv.mod_revision())?,
                etcd_client::EventType::Delete => snap.delete(&base, kv.key(), kv.mod_revision()),
            }
        }
        Ok(())
    }

    /// Places and records a new volume; refuses (changing nothing) a duplicate name, a size no
    /// live node can hold, or too few live nodes (in distinct zones, where nodes have zones).
    pub async fn create_volume(&self, name: &str, size: u64, replicas: usize) -> Result<VolumeSpec> {
        check_name("volume", name)?;
        check_size(size)?;
        for _ in 0..5 {
            let snap = self.snapshot().await?;
            if snap.volumes.contains_key(name) {
                return Err(ClusterError::Refused(format!("volume {name:?} already exists")));
            }
            let chosen =
                placement::place(&snap.loads(), size, replicas).map_err(|e| ClusterError::Refused(e.to_string()))?;
            let spec = VolumeSpec { name: name.into(), size, replicas: chosen, id: crate::wire::new_origin() };
            let key = self.key(&format!("volumes/{name}"));
            // Nothing changed since the snapshot: no other volume placed meanwhile (which could
            // have taken the room counted here), the chosen nodes still alive.
            let mut when = vec![Compare::version(key.clone(), CompareOp::Equal, 0)];
            when.push(Compare::mod_revision(self.key("volumes/"), CompareOp::Less, snap.revision + 1).with_prefix());
            for n in &spec.replicas {
                when.push(Compare::version(self.key(&format!("alive/{n}")), CompareOp::Greater, 0));
            }
            if self.put_if(key, &spec, when).await? {
                return Ok(spec);
            }
        }
        Err(ClusterError::Refused(format!(
            "volume {name:?}: the cluster kept changing while placing it (five tries); try again"
        )))
    }

    /// Re-protection: moves `name`'s replica off `lost` (a node dead past the grace period) to a
    /// node placement chooses from `snap`'s loads, keeping `keep` (the surviving primary) first.
    /// `None` if there is nothing to do any more (the volume is gone, already moved, or `lost`
    /// came back), or if `snap` was out of date: the change is made only if the volume's record
    /// (and its grant) are still those of `snap`, `lost` is still dead and the new node alive. On
    /// success `snap` is updated with the change, so that the next placement made from it counts
    /// this one. `snap` is the node's watched copy of the cluster, not a read of its own: at 1,000
    /// nodes a whole-prefix read per move was up to 50,000 reads a second of some 200,000 keys each
    /// once a zone's grace period ended (the control-plane simulation).
    pub async fn replace_replica(
        &self,
        snap: &mut Snapshot,
        name: &str,
        lost: &str,
        keep: &str,
    ) -> Result<Option<VolumeSpec>> {
        let Some(spec) = snap.volumes.get(name) else { return Ok(None) };
        if snap.alive.contains_key(lost) {
            return Ok(None);
        }
        let key = self.key(&format!("volumes/{name}"));
        let rev = |k: &str| snap.revisions.get(k).copied().unwrap_or(0);
        let Some(moved) = plan::replacement(&snap.loads(), spec, lost, keep)
            .map_err(|e| ClusterError::Refused(format!("re-protecting {name}: {e}")))?
        else {
            return Ok(None);
        };
        let new = moved.replicas.last().expect("a new replica").clone();
        let mut when = vec![
            Compare::mod_revision(key.clone(), CompareOp::Equal, rev(&format!("volumes/{name}"))),
            Compare::version(self.key(&format!("alive/{lost}")), CompareOp::Equal, 0),
            Compare::version(self.key(&format!("alive/{new}")), CompareOp::Greater, 0),
        ];
        // The keys the transaction writes, with their values: the same go into `snap` after it.
        let mut writes = vec![(key, serde_json::to_vec(&moved).expect("serialisable"))];
        // The record becomes solo in the same transaction: the new replica is empty until its
        // copy completes, and a solo record refuses every unforced promotion (found by the
        // control-plane simulation: a volume moved while its record was not solo promoted the
        // empty replica when its primary died during the copy).
        if let Some(g) = snap.grants.get(name) {
            if g.pair == spec.id && g.primary == keep {
                let doc = GrantDoc { solo: true, ..g.clone() };
                let grant_key = self.key(&format!("grants/{name}"));
                when.push(Compare::mod_revision(grant_key.clone(), CompareOp::Equal, rev(&format!("grants/{name}"))));
                writes.push((grant_key, serde_json::to_vec(&doc).expect("serialisable")));
            } else {
                // Not the granted primary any more: someone else decides.
                return Ok(None);
            }
        }
        let ops: Vec<TxnOp> = writes.iter().map(|(k, v)| TxnOp::put(k.clone(), v.clone(), None)).collect();
        let txn = Txn::new().when(when).and_then(ops);
        let resp = self.client().kv_client().txn(txn).await.map_err(|e| self.err(e))?;
        if !resp.succeeded() {
            return Ok(None);
        }
        // What the transaction wrote, at its revision (the response's: a transaction's puts all
        // carry it).
        let at = resp.header().map_or(snap.revision, |h| h.revision());
        let base = self.key("");
        for (k, v) in &writes {
            snap.put(&base, k.as_bytes(), v, 0, at)?;
        }
        Ok(Some(moved))
    }

    /// Removes a dead node for good (`syncblock node remove`): its record goes, and `removed/NAME`
    /// tells the primaries of the volumes it held a replica of to give them a new one now instead
    /// of after the grace period. Refused (changing nothing) for a node that is alive: it would go
    /// on serving what it holds. A removed node that starts again registers as new, and its stale
    /// replicas are removed like those of a node gone past the grace period. Returns the volumes
    /// that held a replica on it.
    pub async fn remove_node(&self, name: &str) -> Result<Vec<String>> {
        check_name("node", name)?;
        let snap = self.snapshot().await?;
        if snap.alive.contains_key(name) {
            return Err(ClusterError::Refused(format!(
                "node {name:?} is alive: stop it first (a removed node must not go on serving its volumes); \
                 its volumes then fail over, and `node remove` gives them new replicas at once"
            )));
        }
        if !snap.members.contains_key(name) {
            let why = if snap.removed.contains(name) { "was already removed" } else { "is not a member" };
            return Err(ClusterError::Refused(format!("node {name:?} {why}")));
        }
        let (alive, member) = (self.key(&format!("alive/{name}")), self.key(&format!("members/{name}")));
        let txn = Txn::new()
            .when(vec![
                Compare::version(alive, CompareOp::Equal, 0),
                Compare::version(member.clone(), CompareOp::Greater, 0),
            ])
            .and_then(vec![
                TxnOp::delete(member, None),
                TxnOp::put(self.key(&format!("removed/{name}")), b"1".to_vec(), None),
            ]);
        let resp = self.client().kv_client().txn(txn).await.map_err(|e| self.err(e))?;
        if !resp.succeeded() {
            return Err(ClusterError::Refused(format!("node {name:?} registered again meanwhile; nothing removed")));
        }
        Ok(snap.volumes.values().filter(|v| v.replicas.iter().any(|r| r == name)).map(|v| v.name.clone()).collect())
    }

    /// Grows a volume to `size` bytes: its record is rewritten if no volume changed since the
    /// snapshot the room was counted from (as `create_volume` does), and each node holding a
    /// replica grows its copy and restarts the volume's replication (`member.rs`), so that both
    /// copies agree on the size again; clients reconnect to see it. Shrinking is refused: it
    /// would discard the blocks past the new end on both copies.
    pub async fn resize_volume(&self, name: &str, size: u64) -> Result<VolumeSpec> {
        check_name("volume", name)?;
        check_size(size)?;
        for _ in 0..5 {
            let snap = self.snapshot().await?;
            let Some(spec) = snap.volumes.get(name) else {
                return Err(ClusterError::Refused(format!("no volume named {name:?}")));
            };
            if size < spec.size {
                return Err(ClusterError::Refused(format!(
                    "{name} is {} bytes: shrinking a cluster volume would discard its blocks past {size} on both \
                     replicas; create a smaller volume and copy what it needs instead",
                    spec.size
                )));
            }
            if size == spec.size {
                return Ok(spec.clone());
            }
            let growth = size - spec.size;
            let loads = snap.loads();
            for r in &spec.replicas {
                let free = loads.iter().find(|l| l.name == *r).map_or(0, |l| l.capacity.saturating_sub(l.committed));
                if free < growth {
                    return Err(ClusterError::Refused(format!(
                        "node {r}, which holds a replica of {name}, has {free} bytes not promised to volumes; \
                         growing {name} by {growth} needs that much on each of its nodes"
                    )));
                }
            }
            let grown = VolumeSpec { size, ..spec.clone() };
            let key = self.key(&format!("volumes/{name}"));
            let rev = snap.revisions.get(&format!("volumes/{name}")).copied().unwrap_or(0);
            let when = vec![
                Compare::mod_revision(key.clone(), CompareOp::Equal, rev),
                Compare::mod_revision(self.key("volumes/"), CompareOp::Less, snap.revision + 1).with_prefix(),
            ];
            if self.put_if(key, &grown, when).await? {
                return Ok(grown);
            }
        }
        Err(ClusterError::Refused(format!(
            "volume {name:?}: the cluster kept changing while resizing it (five tries); try again"
        )))
    }

    /// Writes `value` (as JSON) at `key` if every compare of `when` holds; whether it did.
    async fn put_if(&self, key: String, value: &impl Serialize, when: Vec<Compare>) -> Result<bool> {
        let value = serde_json::to_vec(value).expect("serialisable");
        let txn = Txn::new().when(when).and_then(vec![TxnOp::put(key, value, None)]);
        let resp = self.client().kv_client().txn(txn).await.map_err(|e| self.err(e))?;
        Ok(resp.succeeded())
    }

    /// Deletes a volume's record and its grant; the nodes holding its replicas delete their copies.
    pub async fn delete_volume(&self, name: &str) -> Result<()> {
        check_name("volume", name)?;
        let key = self.key(&format!("volumes/{name}"));
        let txn = Txn::new()
            .when(vec![Compare::version(key.clone(), CompareOp::Greater, 0)])
            .and_then(vec![TxnOp::delete(key, None), TxnOp::delete(self.key(&format!("grants/{name}")), None)]);
        let resp = self.client().kv_client().txn(txn).await.map_err(|e| self.err(e))?;
        if !resp.succeeded() {
            return Err(ClusterError::Refused(format!("no volume named {name:?}")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BASE: &str = "/syncblock/";

    /// A value for `rest` (a key under the prefix) that decodes, varying with `n`.
    fn value(rest: &str, n: u8) -> Vec<u8> {
        let name = rest.split('/').nth(1).unwrap_or("x");
        let doc = if rest.starts_with("members/") {
            serde_json::to_vec(&MemberInfo {
                name: name.into(),
                zone: (n % 2 == 0).then(|| format!("z{n}")),
                nbd: format!("127.0.0.1:{}", 10_000 + n as u16),
                tls: n % 3 == 0,
                repl: "127.0.0.1:7000".parse().unwrap(),
                admin: None,
                capacity: n as u64 * 4096,
            })
        } else if rest.starts_with("volumes/") {
            serde_json::to_vec(&VolumeSpec {
                name: name.into(),
                size: n as u64 * 4096,
                replicas: vec!["a".into(), "b".into()],
                id: n as u64 + 1,
            })
        } else if rest.starts_with("grants/") {
            serde_json::to_vec(&GrantDoc {
                pair: n as u64 + 1,
                epoch: n as u64,
                primary: "a".into(),
                solo: n % 3 == 0,
                synced: true,
            })
        } else {
            return Vec::new();
        };
        doc.unwrap()
    }

    const KEYS: [&str; 10] = [
        "members/a",
        "members/b",
        "alive/a",
        "alive/b",
        "volumes/v1",
        "volumes/v2",
        "grants/v1",
        "grants/v2",
        "removed/b",
        "other/thing",
    ];

    proptest! {
        /// A node that applies every change a watch reports holds what a fresh read of the whole
        /// prefix would give it: the same records, leases, per-key revisions and revision.
        #[test]
        fn applying_watched_changes_equals_reading_everything_again(
            ops in proptest::collection::vec((0..KEYS.len(), any::<bool>(), any::<u8>()), 0..60)
        ) {
            let mut watched = Snapshot::default();
            // etcd's view: key → (value, lease, mod revision).
            let mut store: BTreeMap<&str, (Vec<u8>, i64, i64)> = BTreeMap::new();
            for (rev, (k, put, n)) in ops.into_iter().enumerate() {
                let rev = rev as i64 + 1;
                let key = format!("{BASE}{}", KEYS[k]);
                if put {
                    let v = value(KEYS[k], n);
                    watched.put(BASE, key.as_bytes(), &v, n as i64, rev).unwrap();
                    store.insert(KEYS[k], (v, n as i64, rev));
                } else {
                    watched.delete(BASE, key.as_bytes(), rev);
                    store.remove(KEYS[k]);
                }
                // A fresh read at this revision (keys come back in any order; here, sorted).
                let mut read = Snapshot { revision: rev, ..Snapshot::default() };
                for (rest, (v, lease, r)) in &store {
                    read.put(BASE, format!("{BASE}{rest}").as_bytes(), v, *lease, *r).unwrap();
                }
                prop_assert_eq!(&watched, &read);
            }
        }
    }

    #[test]
    fn a_record_that_does_not_decode_is_an_error_and_keys_elsewhere_are_ignored() {
        let mut s = Snapshot::default();
        assert!(s.put(BASE, b"/syncblock/volumes/v", b"{not json", 0, 3).is_err());
        s.put(BASE, b"/elsewhere/volumes/v", b"{not json", 0, 4).unwrap();
        s.delete(BASE, b"/elsewhere/volumes/v", 5);
        assert_eq!(s, Snapshot::default());
    }
}
