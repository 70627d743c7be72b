//! The command line: every subcommand and its flags. Each flag lives on the subcommands it acts
//! on (a `--store` on `witness` would do nothing, so it is not accepted there).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use syncblock_nbd::config::{ReplNodeOptions, ReplPolicy, ReplRole, ReplVolume, VolumeSpec};
use syncblock_nbd::handshake::TlsMode;
use syncblock_nbd::server::AccessRule;
use syncblock_nbd::size::parse_size;

/// The default admin endpoint of `syncblock pair` (the NBD port plus one would collide with a
/// second `pair` less predictably than a fixed, documented port).
pub const PAIR_ADMIN: &str = "127.0.0.1:7950";

#[derive(Parser, Debug)]
#[command(name = "syncblock", version, about = "Crash-safe block store exported over NBD, mirrored synchronously")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// TLS credentials (docs/security.md): the same flags on every command that opens or accepts a
/// link.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// This process's certificate (PEM). A node's certificate carries its node name as CN (peers
    /// check it) and, for NBD clients, its host name or address as a subject alternative name.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA certificate(s) (PEM). Given, every peer must present a certificate signed by it: NBD
    /// clients, replication peers, witness and admin callers.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// PSK file of `identity:hexkey` lines (`psktool -u NAME -p FILE` makes one). A node
    /// connects as its node name, which must have a key in the file.
    #[arg(long, value_name = "FILE")]
    pub tls_psk: Option<PathBuf>,
}

/// The credentials of an admin command (`status`, `verify`, `promote`, `demote`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct AdminTls {
    #[command(flatten)]
    pub files: TlsArgs,
    /// The PSK identity to connect as [default: the only identity in --tls-psk].
    #[arg(long, value_name = "NAME", requires = "tls_psk")]
    pub tls_user: Option<String>,
    /// The node name (CN) the admin endpoint's certificate must carry; a server the CA signed
    /// under another name is refused [default: any the CA signed].
    #[arg(long, value_name = "NAME", requires = "tls_ca")]
    pub admin_node: Option<String>,
}

impl TlsArgs {
    pub fn files(&self) -> syncblock_replicator::tls::TlsFiles {
        syncblock_replicator::tls::TlsFiles {
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            ca: self.tls_ca.clone(),
            psk: self.tls_psk.clone(),
        }
    }
}

impl AdminTls {
    /// The admin endpoint at `addr`, reached with these credentials (if any).
    pub fn admin_at(&self, addr: SocketAddr) -> anyhow::Result<crate::client::AdminAt> {
        let files = self.files.files();
        let tls = if files.is_empty() {
            None
        } else {
            Some(syncblock_replicator::tls::Tls::load_client(&files, self.tls_user.as_deref())?)
        };
        Ok(crate::client::AdminAt { addr, tls, node: self.admin_node.clone() })
    }
}

/// Worker threads of a serving process.
#[derive(clap::Args, Debug)]
pub struct Threads {
    /// Worker threads [default: half the CPUs, at least 1].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: Option<u16>,
}

// Parsed once at startup; boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve every volume of a store as an NBD export named after it.
    Serve {
        /// The store file or block device [default: syncblock-data/store.img].
        #[arg(long)]
        store: Option<PathBuf>,
        /// Create the store if it does not exist (without it, a missing store is an error, so that
        /// a typo in --store never serves a new, empty volume under a known export name).
        #[arg(long)]
        create: bool,
        /// TOML file with these options (format in README.md); flags given as well override it.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Size of the store file to create with --create [default: 10GiB]. Units: K, M, G, T
        /// and KiB, MiB, GiB, TiB are powers of 1024; KB, MB, GB, TB powers of 1000.
        #[arg(long, value_parser = size_arg)]
        size: Option<u64>,
        /// Volumes to create if missing, as NAME:SIZE (repeatable). Without any, and with no
        /// volume in the store, a volume "default" as large as the store is created.
        #[arg(long = "volume", value_name = "NAME:SIZE", value_parser = volume_arg)]
        volumes: Vec<VolumeSpec>,
        /// TCP address to listen on [default: 127.0.0.1:10809].
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Also listen on this unix socket.
        #[arg(long)]
        unix: Option<PathBuf>,
        /// The volume served under the empty export name (default: the first volume).
        #[arg(long)]
        default_export: Option<String>,
        /// Export this volume read-only (repeatable).
        #[arg(long = "read-only", value_name = "NAME")]
        read_only: Vec<String>,
        /// Answer a write without FUA only once it is written, not once it is queued
        /// (write-back, the default). NBD promises durability only for FUA writes and flushes
        /// either way; write-through also keeps every answered write across a crash of this
        /// process (not of the machine), at the cost of latency (docs/durability.md).
        #[arg(long)]
        write_through: bool,
        /// When creating the store file, write zeros over all of it first (like `qemu-img create
        /// -o preallocation=full`): a sparse file makes every durable write about twice as slow
        /// until the log has wrapped once (ext4 allocates blocks and commits its journal). Takes
        /// a few seconds per 10 GiB; ignored for an existing store and for block devices.
        #[arg(long)]
        zero_fill: bool,
        /// HTTP admin endpoint: `GET /status` (JSON), `GET /metrics` (Prometheus), and the
        /// commands behind `syncblock status`, `promote`, `demote` and `verify`.
        #[arg(long)]
        admin: Option<SocketAddr>,
        /// NBD TLS: off, on (offered; plaintext clients may use exports without an access list)
        /// or require [default: require with credentials, off without].
        #[arg(long, value_enum)]
        tls: Option<TlsMode>,
        #[command(flatten)]
        tls_files: TlsArgs,
        /// Only this client identity (certificate CN or PSK identity) may open VOLUME; `:ro` makes
        /// it read-only for that client. Repeatable; a volume without any is open to every client
        /// that passes TLS.
        #[arg(long = "allow", value_name = "VOLUME:IDENTITY[:ro]", value_parser = allow_arg)]
        allow: Vec<(String, AccessRule)>,
        /// Only this identity (certificate CN or PSK identity) may call the admin endpoint; `:ro`
        /// lets it only read (status, metrics), not promote, demote or verify. Repeatable; without
        /// any, every identity the TLS credentials prove may call it.
        #[arg(long = "admin-allow", value_name = "IDENTITY[:ro]", value_parser = admin_allow_arg)]
        admin_allow: Vec<AccessRule>,
        /// Allow listening on addresses other hosts can reach without TLS (logged as INSECURE).
        #[arg(long)]
        insecure: bool,
        #[command(flatten)]
        repl: ReplArgs,
        #[command(flatten)]
        threads: Threads,
    },
    /// Run a replicated pair and its witness in one process: a primary serving NBD and a secondary
    /// on its own store, mirrored synchronously over loopback, with epochs granted by the witness
    /// (a demonstration of the full path; real deployments run one `serve --role …` per node and
    /// a `witness` on a third machine). Creates its stores in --data-dir the first time.
    Pair {
        /// Size of each store file to create when it does not exist (units as for `serve --size`).
        #[arg(long, default_value = "10GiB", value_parser = size_arg)]
        size: u64,
        /// TCP address for NBD.
        #[arg(long, default_value = "127.0.0.1:10809")]
        listen: SocketAddr,
        /// Directory holding both stores and the witness's state.
        #[arg(long, default_value = "syncblock-data")]
        data_dir: PathBuf,
        /// HTTP admin endpoint of the primary, for `syncblock status`, `promote`, `verify` and
        /// Prometheus (`/metrics`).
        #[arg(long, default_value = PAIR_ADMIN)]
        admin: SocketAddr,
        #[command(flatten)]
        threads: Threads,
    },
    /// Run the witness: the tie-breaker that grants epochs, solo operation and failover.
    Witness {
        /// TCP address to listen on.
        #[arg(long, default_value = "127.0.0.1:7100")]
        listen: SocketAddr,
        /// File holding the witness's decisions (created if missing).
        #[arg(long, default_value = "syncblock-data/witness.state")]
        state: PathBuf,
        /// The lease a primary holds: it may acknowledge writes alone (degrade policy) for this
        /// long after sending a request the witness answered, and the witness hands its role to
        /// another node only after 1.5 leases without a report from it. Failover after a
        /// primary's crash takes about 1.5 leases (docs/replication.md, "Failover time").
        #[arg(long, alias = "timeout-ms", default_value = "500", value_name = "MS",
              value_parser = clap::value_parser!(u64).range(20..=600_000))]
        lease_ms: u64,
        #[command(flatten)]
        tls_files: TlsArgs,
        /// Only this node (its certificate CN or PSK identity) may ask for epochs, solo operation
        /// and promotion, in any pair; `A,B`: nodes A and B, each only in the pair of the two.
        /// Repeatable; without any, every identity the TLS credentials prove may. Needs --tls-ca
        /// or --tls-psk.
        #[arg(long = "allow", value_name = "NODE[,NODE]")]
        allow: Vec<String>,
        /// Allow listening on an address other hosts can reach without TLS (logged as INSECURE).
        #[arg(long)]
        insecure: bool,
    },
    /// Show a node's status: its store, and per volume the role, epoch, peer, lag in bytes and
    /// seconds, whether RPO = 0 holds, and resync and verify progress.
    Status {
        /// The node's --admin address.
        #[arg(long)]
        admin: SocketAddr,
        /// Only this volume [default: every one].
        #[arg(long)]
        volume: Option<String>,
        /// Print the status as one JSON object (the admin endpoint's `GET /status`).
        #[arg(long)]
        json: bool,
        /// On a primary: wait until every replicated volume (or --volume) has RPO = 0 (its peer
        /// connected and in sync), showing the resync's progress, then print the status. Fails
        /// after --wait-max.
        #[arg(long)]
        wait_sync: bool,
        /// The longest --wait-sync waits, in seconds.
        #[arg(long, default_value = "86400", value_name = "SECS")]
        wait_max: u64,
        #[command(flatten)]
        tls: AdminTls,
    },
    /// Compare both replicas of a primary's volume by block checksums while I/O continues; prints
    /// the differing ranges and fails if there are any.
    Verify {
        /// The primary's --admin address.
        #[arg(long)]
        admin: SocketAddr,
        /// Also rewrite the differing blocks on the secondary from the primary's copy.
        #[arg(long)]
        repair: bool,
        /// The replicated volume (needed when the node replicates more than one).
        #[arg(long)]
        volume: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        tls: AdminTls,
    },
    /// Promote a secondary to primary (asks the witness, if the node has one).
    Promote {
        /// The node's --admin address.
        #[arg(long)]
        admin: SocketAddr,
        /// Take over even if the witness says the old primary may hold writes this node lacks.
        #[arg(long)]
        force: bool,
        /// The replicated volume (needed when the node replicates more than one).
        #[arg(long)]
        volume: Option<String>,
        #[command(flatten)]
        tls: AdminTls,
    },
    /// Step a primary down to secondary: resolves a split brain without a witness (both nodes
    /// primary in the same epoch). This node's writes that its peer lacks are discarded when the
    /// peer resyncs it.
    Demote {
        /// The node's --admin address.
        #[arg(long)]
        admin: SocketAddr,
        /// The replicated volume (needed when the node replicates more than one).
        #[arg(long)]
        volume: Option<String>,
        #[command(flatten)]
        tls: AdminTls,
    },
    /// Hand a primary's role to its in-sync peer, a planned switchover: new writes wait while those
    /// in flight are confirmed by the peer, the witness (or etcd) makes the peer primary, and this
    /// node steps down to secondary. Clients then reconnect to the peer. Refused unless the peer is
    /// in sync.
    Switchover {
        /// The primary's --admin address.
        #[arg(long)]
        admin: SocketAddr,
        /// The replicated volume (needed when the node replicates more than one).
        #[arg(long)]
        volume: Option<String>,
        #[command(flatten)]
        tls: AdminTls,
    },
    /// Manage volumes: of a cluster (with --etcd), or of a store offline (no server may be
    /// running on the store).
    Volume {
        /// The store file or block device [default: syncblock-data/store.img].
        #[arg(long, global = true, conflicts_with = "etcd")]
        store: Option<PathBuf>,
        /// The cluster's etcd endpoints, comma-separated (docs/cluster.md).
        #[arg(long, global = true, value_name = "URLS")]
        etcd: Option<String>,
        #[command(flatten)]
        etcd_tls: EtcdTlsArgs,
        #[command(subcommand)]
        command: VolumeCommand,
    },
    /// Run a cluster node (docs/cluster.md): one store, registered in etcd, serving the volumes it
    /// is primary of and replicating those it holds; or `node list`.
    #[command(args_conflicts_with_subcommands = true)]
    Node {
        #[command(subcommand)]
        command: Option<NodeCommand>,
        #[command(flatten)]
        run: NodeArgs,
    },
}

/// TLS to etcd (docs/cluster.md): PEM files; the `--etcd` endpoints are then `https://` URLs.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct EtcdTlsArgs {
    /// CA certificate(s) that signed etcd's server certificate.
    #[arg(long, value_name = "FILE", global = true)]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate, for an etcd that requires one (`--client-cert-auth`).
    #[arg(long, value_name = "FILE", requires = "etcd_key", global = true)]
    pub etcd_cert: Option<PathBuf>,
    /// The client certificate's key.
    #[arg(long, value_name = "FILE", requires = "etcd_cert", global = true)]
    pub etcd_key: Option<PathBuf>,
}

impl EtcdTlsArgs {
    pub fn tls(&self) -> Option<syncblock_replicator::cluster::EtcdTls> {
        (self.etcd_ca.is_some() || self.etcd_cert.is_some()).then(|| syncblock_replicator::cluster::EtcdTls {
            ca: self.etcd_ca.clone(),
            cert: self.etcd_cert.clone(),
            key: self.etcd_key.clone(),
        })
    }
}

/// `syncblock node`'s flags.
#[derive(clap::Args, Debug)]
pub struct NodeArgs {
    /// The cluster's etcd endpoints, comma-separated (e.g. http://127.0.0.1:2379).
    #[arg(long, value_name = "URLS")]
    pub etcd: Option<String>,
    #[command(flatten)]
    pub etcd_tls: EtcdTlsArgs,
    /// This node's name in the cluster (unique; its certificate's CN with TLS).
    #[arg(long)]
    pub name: Option<String>,
    /// Its store [default: syncblock-data/NAME.img]; created with --size if missing.
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// The store's size when it is created.
    #[arg(long, value_parser = size_arg, default_value = "10GiB")]
    pub size: u64,
    /// NBD listener: clients connect here for the volumes this node is primary of.
    #[arg(long, default_value = "127.0.0.1:10809")]
    pub listen: SocketAddr,
    /// The one replication listener of this node, shared by all its volumes.
    #[arg(long, default_value = "127.0.0.1:7900")]
    pub repl_listen: SocketAddr,
    /// Admin endpoint (status, metrics).
    #[arg(long)]
    pub admin: Option<SocketAddr>,
    /// Only this identity may call the admin endpoint; `:ro` lets it only read (see `serve
    /// --admin-allow`). Repeatable.
    #[arg(long = "admin-allow", value_name = "IDENTITY[:ro]", value_parser = admin_allow_arg)]
    pub admin_allow: Vec<AccessRule>,
    /// Failure domain (rack, room, site): a volume's replicas are placed in different zones.
    #[arg(long)]
    pub zone: Option<String>,
    /// The etcd lease TTL this node asks for, in ms; a dead node's volumes fail over about this
    /// long after its death (etcd may raise it to its minimum) [default: 1000].
    #[arg(long, value_name = "MS")]
    pub lease_ms: Option<u64>,
    /// Seconds a peer node may be gone before this node, as a volume's primary, gives the volume
    /// a new replica on another node (a full copy); a node back sooner resyncs incrementally.
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    pub grace: u64,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Allow listening on non-loopback addresses without TLS that authenticates callers.
    #[arg(long)]
    pub insecure: bool,
    #[command(flatten)]
    pub threads: Threads,
}

#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// List the cluster's nodes: name, zone, alive, volumes, primaries, free bytes.
    List {
        #[arg(long, value_name = "URLS")]
        etcd: String,
        #[command(flatten)]
        etcd_tls: EtcdTlsArgs,
        #[arg(long)]
        json: bool,
    },
    /// Remove a dead node for good: the volumes it held a replica of get a new replica on another
    /// node now, not after the grace period (`--grace`). Refused for a node that is alive. A
    /// removed node that starts again joins as new, and its stale replicas are removed.
    Remove {
        /// The node's name.
        name: String,
        #[arg(long, value_name = "URLS")]
        etcd: String,
        #[command(flatten)]
        etcd_tls: EtcdTlsArgs,
    },
    /// Move every primary role off a node (a switchover of each volume it is primary of and that is
    /// in sync, to that volume's secondary), before maintenance: stopping it then costs its
    /// volumes no failover. Its replicas stay; volumes not in sync are named and left. Asks each
    /// move of the node's admin endpoint (`node --admin`).
    Drain {
        /// The node's name.
        name: String,
        #[arg(long, value_name = "URLS")]
        etcd: String,
        #[command(flatten)]
        etcd_tls: EtcdTlsArgs,
        #[command(flatten)]
        admin_tls: AdminTls,
    },
    /// Spread primary roles evenly over the live nodes again (after failovers or a drain left them
    /// on a few): switchovers of in-sync volumes to their secondaries, from the nodes with the most
    /// primaries to those with the fewest.
    Balance {
        #[arg(long, value_name = "URLS")]
        etcd: String,
        #[command(flatten)]
        etcd_tls: EtcdTlsArgs,
        #[command(flatten)]
        admin_tls: AdminTls,
        /// Print the moves without making them.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Synchronous replication (see docs/replication.md). These flags replicate one volume; the
/// config file can replicate several, each with its own replication port.
#[derive(clap::Args, Debug)]
pub struct ReplArgs {
    /// This node's role for the replicated volume the first time it runs; afterwards the role the
    /// store last had wins (promotion and deposition change it). Without it (and without
    /// `replicate` in the config file), nothing is replicated.
    #[arg(long, value_enum)]
    role: Option<ReplRole>,
    /// The peer's replication address (its --repl-listen), dialed while this node is primary.
    #[arg(long, requires = "role")]
    peer: Option<SocketAddr>,
    /// The peer's node name (its --node): only it may connect as this volume's primary, and with
    /// TLS certificates it must prove that name [default: any node that names this pair].
    #[arg(long, requires = "role", value_name = "NAME")]
    peer_node: Option<String>,
    /// Where to accept the primary's replication connection while this node is secondary.
    #[arg(long, requires = "role")]
    repl_listen: Option<SocketAddr>,
    /// The replicated volume (default: the default export).
    #[arg(long, requires = "role")]
    replicate: Option<String>,
    /// This node's name in logs, at the witness and in its peer's messages [default: syncblock].
    #[arg(long)]
    node: Option<String>,
    /// Heartbeat timeout: a silent link is declared dead after this long [default: 1000].
    #[arg(long, value_name = "MS")]
    repl_timeout_ms: Option<u64>,
    /// The witness (`syncblock witness`): grants epochs, solo operation and failover.
    #[arg(long)]
    witness: Option<SocketAddr>,
    /// With certificates: the name (CN) the witness's certificate must carry; a server signed by
    /// the CA under another name is refused [default: any the CA signed].
    #[arg(long, value_name = "NAME", requires = "witness")]
    witness_node: Option<String>,
    /// What the primary does while its peer is away: wait (strict, RPO = 0, no automatic
    /// failover) or continue alone with the witness's consent (degrade) [default: degrade with
    /// --witness, strict without].
    #[arg(long, value_enum, requires = "role")]
    policy: Option<ReplPolicy>,
    /// Do not promote this node automatically when its primary is gone (with a witness, it does
    /// by default).
    #[arg(long, requires = "role")]
    no_auto_failover: bool,
}

impl ReplArgs {
    /// The replicated volume these flags describe (if any) and this node's settings.
    pub fn options(self, admin: Option<SocketAddr>) -> (Vec<ReplVolume>, ReplNodeOptions) {
        let volume = self.role.map(|role| ReplVolume {
            volume: self.replicate,
            role,
            peer: self.peer,
            peer_node: self.peer_node,
            listen: self.repl_listen,
            policy: self.policy,
            auto_failover: !self.no_auto_failover,
        });
        let node = ReplNodeOptions {
            node: self.node,
            witness: self.witness,
            witness_node: self.witness_node,
            timeout_ms: self.repl_timeout_ms,
            admin,
        };
        (volume.into_iter().collect(), node)
    }
}

#[derive(Subcommand, Debug)]
pub enum VolumeCommand {
    /// Create a thin volume (it uses store space only as it is written). With --etcd, placed on
    /// --replicas nodes; prints the volume as JSON.
    Create {
        name: String,
        /// Its size (units as for `serve --size`); a multiple of 4 KiB.
        #[arg(value_parser = size_arg, required_unless_present = "size_flag")]
        size: Option<u64>,
        /// The size, as a flag (the same as the positional size).
        #[arg(long = "size", id = "size_flag", value_parser = size_arg, conflicts_with = "size")]
        size_flag: Option<u64>,
        /// Copies in the cluster (with --etcd): a primary and its synchronous mirror.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(2..=2))]
        replicas: u16,
    },
    /// List the volumes: name, size, bytes written; with --etcd, where each is served.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Grow or shrink a volume of a store (shrinking discards the blocks past the new end); with
    /// --etcd, grow a cluster volume (both replicas restart at the new size; clients reconnect).
    Resize {
        name: String,
        #[arg(value_parser = size_arg)]
        size: u64,
    },
    /// Delete a volume and everything written to it.
    Delete { name: String },
    /// With --etcd: move a cluster volume's primary role to its in-sync secondary (a planned
    /// switchover, asked of its primary's admin endpoint; see `syncblock switchover`).
    Switchover {
        name: String,
        #[command(flatten)]
        admin_tls: AdminTls,
    },
}

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).ok_or_else(|| {
        format!("invalid size {s:?}: use e.g. 10GiB or 10G (powers of 1024), 10GB (powers of 1000), or bytes")
    })
}

fn admin_allow_arg(s: &str) -> Result<AccessRule, String> {
    syncblock_nbd::config::admin_allow_flag(s).map_err(|e| e.to_string())
}

fn allow_arg(s: &str) -> Result<(String, AccessRule), String> {
    syncblock_nbd::config::allow_flag(s).map_err(|e| e.to_string())
}

fn volume_arg(s: &str) -> Result<VolumeSpec, String> {
    VolumeSpec::from_flag(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_are_accepted_only_where_they_act() {
        assert!(Cli::try_parse_from(["syncblock", "witness", "--store", "x"]).is_err());
        assert!(Cli::try_parse_from(["syncblock", "status", "--admin", "127.0.0.1:1", "--threads", "2"]).is_err());
        assert!(Cli::try_parse_from(["syncblock", "pair", "--store", "x"]).is_err());
        assert!(Cli::try_parse_from(["syncblock", "serve", "--store", "x", "--create", "--threads", "2"]).is_ok());
        assert!(Cli::try_parse_from(["syncblock", "volume", "list", "--store", "x"]).is_ok());
        assert!(Cli::try_parse_from(["syncblock", "volume", "--store", "x", "list"]).is_ok());
    }
}
