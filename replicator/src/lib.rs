//! syncblock's replicator: synchronous mirroring of a volume to a peer over TCP.
//!
//! A replicated volume has a [`Primary`], which serves clients and ships every write, trim and flush
//! to its peer, and a [`Secondary`], which applies them to its own store in the primary's order.
//! Every write carries a *tag*, its sequence number in the volume's history, stored with it in both
//! logs, so "how far is the peer" is one number, acknowledgements are cumulative, and a returning
//! peer is brought back by shipping what changed after the last tag both sides share.
//! `docs/replication.md` states the rules and the argument.

pub mod authority;
pub mod cluster;
pub mod link;
pub mod net;
pub mod node;
pub mod primary;
pub mod secondary;
pub mod simnet;
pub mod state;
pub mod status;
pub mod tls;
pub mod wire;
pub mod witness;

/// What the crate's unit tests share.
#[cfg(test)]
pub(crate) mod testutil {
    use syncblock_engine::sim::{SimDevice, SimDisk};
    use syncblock_engine::{Config, Driver, Store, VolumeInfo};

    /// A store on a 32 MiB simulated disk (its engine a task on this runtime) holding volume `v`
    /// of `vol_bytes`.
    pub async fn sim_store(vol_bytes: u64) -> (Store, VolumeInfo) {
        let disk = SimDisk::formatted(32 << 20, 1 << 20).unwrap();
        let engine = Config { driver: Driver::Runtime(tokio::runtime::Handle::current()), ..Config::default() };
        let store = Store::open_device_async(Box::new(SimDevice::new(disk)), engine, "sim").await.unwrap();
        let info = store.create_volume("v", vol_bytes).await.unwrap();
        (store, info)
    }
}

pub use node::{Node, NodeConfig, NodeStatus};
pub use primary::{PeerView, Primary, PrimaryStatus, Progress, VerifyReport};
pub use secondary::{Secondary, SecondaryStatus};
pub use state::{ReplState, Role};
pub use status::StatusView;

use std::time::Duration;

/// Replication timing and identity.
#[derive(Clone)]
pub struct ReplConfig {
    /// This node's name, for logs and the peer's messages.
    pub node: String,
    /// How often the primary sends a heartbeat on the link and reports to the witness. 125 ms:
    /// a quarter of the witness's default lease, so a lease survives three lost reports.
    pub heartbeat: Duration,
    /// A link that carries nothing for this long is declared dead. 1 s: eight missed
    /// heartbeats, long enough to ride out a scheduling hiccup on a loaded 2-core machine. It
    /// only matters when a host dies without closing its sockets (a power cut): a crashed
    /// process's connections close at once, and failover then waits only for the witness's
    /// takeover window (`witness::takeover_window`). A link declared dead wrongly costs a
    /// reconnection and a short resync, never a failover: that needs the witness to have lost
    /// the primary's reports too.
    pub timeout: Duration,
    /// Pause between reconnection attempts.
    pub reconnect: Duration,
    /// The authority that grants epochs and solo operation (a witness, or etcd in cluster mode);
    /// without one, a pair has a fixed primary and only the strict policy.
    pub authority: Option<authority::SharedAuthority>,
    /// What the primary does while its peer is away.
    pub policy: Policy,
    /// The peer's node name, if configured: a hello from another node is refused, and with TLS the
    /// peer's certificate must be for this name (a node connecting proves it in `net::Who`; a
    /// node connected to, in `TlsNet`'s expectations). `None`: any node that names this pair.
    pub peer_node: Option<String>,
    /// The network (TCP, or the simulation's).
    pub net: std::sync::Arc<dyn net::Net>,
    /// Resync data shipped and not yet confirmed, in bytes, for all the volumes whose configs
    /// are clones of this one (a cluster node's, or one `serve` process's): at most
    /// [`RESYNC_NODE_BYTES_MAX`] together.
    pub resync_bytes: std::sync::Arc<tokio::sync::Semaphore>,
}

/// How often a quiet volume pings a peer node that answers its link's heartbeat
/// ([`net::Net::peer_beats`]), and reports to an authority that allows it
/// ([`authority::Authority::quiet_reports`]): 1 s, against [`ReplConfig::heartbeat`] (125 ms)
/// while it has anything to send. The link's own
/// heartbeat (`cluster::mux::LINK_BEAT`) proves the peer node alive for all its volumes at once,
/// and closes every stream when the peer goes silent; a volume's own pings then only prove that
/// its peer's session still answers. With 100 idle replicas a node spent 3.7–3.9 % of a core on
/// 8 pings, 8 pongs and 8 reports a second per volume (docs/cluster.md, "CPU while idle"). A
/// node's quiet volumes fall due together, on one grid of this period ([`net::Net::quiet_due`]).
pub const QUIET_EVERY: Duration = Duration::from_secs(1);

impl ReplConfig {
    /// How long a volume's stream may carry nothing before it is declared dead: the timeout, or on
    /// a beating node link, where a quiet volume pings only every [`QUIET_EVERY`], three quiet
    /// pings more (4 s by default). A peer node that dies or goes silent is noticed by its link
    /// within [`ReplConfig::timeout`] whatever this is; this bounds only a session that stopped
    /// answering on a live node.
    pub fn silence_limit(&self) -> Duration {
        if self.net.links_beat() {
            self.timeout + 3 * QUIET_EVERY
        } else {
            self.timeout
        }
    }
}

/// Resync data in flight for one node's volumes together: 64 MiB, four volumes copying at their
/// full window (16 MiB each) at once. A node lost for good leaves hundreds of volumes to copy
/// again on the others; without a shared bound each would hold its own 16 MiB of reads in flight
/// (1.6 GiB for 100 volumes), and the disk gains nothing from the extra depth.
pub const RESYNC_NODE_BYTES_MAX: u64 = 64 << 20;

impl std::fmt::Debug for ReplConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplConfig")
            .field("node", &self.node)
            .field("heartbeat", &self.heartbeat)
            .field("timeout", &self.timeout)
            .field("authority", &self.authority.as_ref().map(|a| a.describe()))
            .field("policy", &self.policy)
            .field("peer_node", &self.peer_node)
            .finish_non_exhaustive()
    }
}

/// What a primary does when its peer is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Writes wait until the peer is back and resynced: RPO = 0 always, and no automatic
    /// failover (a survivor promoted under this policy could never write: its peer is the node
    /// that died). The default without a witness.
    Strict,
    /// After the heartbeat timeout, continue alone if (and only while) the witness consents,
    /// tracking by tag what the peer misses; the peer is then not promotable until resynced. A
    /// node promoted by failover serves alone the same way. The default with a witness.
    Degrade,
}

impl Policy {
    /// The default: degrade with a witness (automatic failover then yields a primary that
    /// serves), strict without one (the degrade policy needs the witness's consent).
    pub fn default_for(witness: bool) -> Policy {
        if witness {
            Policy::Degrade
        } else {
            Policy::Strict
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Policy::Strict => "strict",
            Policy::Degrade => "degrade",
        }
    }
}

impl Default for ReplConfig {
    fn default() -> Self {
        ReplConfig {
            node: "syncblock".into(),
            heartbeat: Duration::from_millis(125),
            timeout: Duration::from_secs(1),
            reconnect: Duration::from_millis(100),
            authority: None,
            policy: Policy::Strict,
            peer_node: None,
            net: net::tcp(),
            resync_bytes: std::sync::Arc::new(tokio::sync::Semaphore::new(RESYNC_NODE_BYTES_MAX as usize)),
        }
    }
}

/// Why a replicated operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplError {
    #[error("engine: {0}")]
    Engine(#[from] syncblock_engine::Error),
    #[error("replication stopped: {0}")]
    Stopped(String),
    /// The peer or the witness said no: `why` is what code decides on, `reason` the message.
    #[error("{reason}")]
    Refused { why: wire::Refusal, reason: String },
    /// This node refuses: the request conflicts with its configuration or its state.
    #[error("{0}")]
    Invalid(String),
    #[error("wire: {0}")]
    Wire(#[from] wire::WireError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl ReplError {
    pub fn refused(why: wire::Refusal, reason: impl Into<String>) -> ReplError {
        ReplError::Refused { why, reason: reason.into() }
    }

    /// The kind of failure, for the layers that answer clients (NBD, the admin endpoint).
    pub fn class(&self) -> syncblock_engine::ErrorClass {
        use syncblock_engine::ErrorClass;
        match self {
            ReplError::Engine(e) => e.class(),
            ReplError::Stopped(_) => ErrorClass::ShuttingDown,
            ReplError::Refused { .. } | ReplError::Invalid(_) => ErrorClass::Conflict,
            ReplError::Wire(_) | ReplError::Io(_) => ErrorClass::Failed,
        }
    }

    /// The refusal, if the peer or the witness refused.
    pub fn refusal(&self) -> Option<wire::Refusal> {
        match self {
            ReplError::Refused { why, .. } => Some(*why),
            _ => None,
        }
    }
}

pub type Result<T, E = ReplError> = std::result::Result<T, E>;
