//! `syncblock`: serve engine volumes over NBD (`serve`) and manage volumes offline (`volume`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use syncblock_engine::{Config, CreateOptions, Driver, Store};
use syncblock_nbd::config::{
    ReplNodeOptions, ReplPolicy, ReplRole, ReplVolume, ServeOptions, ServeSettings, VolumeSpec,
    DEFAULT_REPL_TIMEOUT_MS, DEFAULT_STORE,
};
use syncblock_nbd::size::{format_size, parse_size};
use syncblock_nbd::{Listener, ServerConfig};

const DEFAULT_VOLUME: &str = "default";
/// The primary's node name in `syncblock pair`: what its witness records as the primary.
const PAIR_PRIMARY_NODE: &str = "primary";

#[derive(Parser, Debug)]
#[command(name = "syncblock", version, about = "Crash-safe block store exported over NBD")]
struct Cli {
    /// The store file or block device [default: syncblock-data/store.img].
    #[arg(long, global = true)]
    store: Option<PathBuf>,
    /// Worker threads for `serve` and `pair` [default: half the CPUs, at least 1].
    #[arg(long, global = true, value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
    #[command(subcommand)]
    command: Command,
}

// Parsed once at startup; boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Serve every volume as an NBD export named after it, creating the store if missing.
    Serve {
        /// TOML file with these options (format in README.md); flags given as well override it.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Size of the store file to create when it does not exist [default: 10GiB].
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
        #[command(flatten)]
        repl: ReplArgs,
    },
    /// Run a replicated pair and its witness in one process: a primary serving NBD and a secondary
    /// on its own store, mirrored synchronously over loopback, with epochs granted by the witness
    /// (a demonstration of the full path; real deployments run one `serve --role …` per node and
    /// a `witness` on a third machine).
    Pair {
        /// Size of each store file to create when it does not exist.
        #[arg(long, default_value = "10GiB", value_parser = size_arg)]
        size: u64,
        /// TCP address for NBD.
        #[arg(long, default_value = "127.0.0.1:10809")]
        listen: SocketAddr,
        /// Directory holding both stores and the witness's state.
        #[arg(long, default_value = "syncblock-data")]
        data_dir: PathBuf,
        /// Admin endpoint of the primary, for `syncblock status`, `promote` and `verify`.
        #[arg(long)]
        admin: Option<SocketAddr>,
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
    },
    /// Print a node's replication status as JSON (role, epoch, peer, lag in tags and bytes, RPO,
    /// resync and verify progress).
    Status {
        /// The node's --admin address.
        #[arg(long)]
        admin: SocketAddr,
        /// Only this replicated volume [default: every one, a JSON object per line].
        #[arg(long)]
        volume: Option<String>,
    },
    /// Compare both replicas of a primary's volume by block checksums while I/O continues; prints
    /// the differing ranges as JSON and fails if there are any.
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
    },
    /// Manage volumes (the server must not be running on the same store).
    Volume {
        #[command(subcommand)]
        command: VolumeCommand,
    },
}

/// Synchronous replication (see docs/replication.md). These flags replicate one volume; the
/// config file can replicate several, each with its own replication port.
#[derive(clap::Args, Debug)]
struct ReplArgs {
    /// This node's role for the replicated volume the first time it runs; afterwards the role the
    /// store last had wins (promotion and deposition change it). Without it (and without
    /// `replicate` in the config file), nothing is replicated.
    #[arg(long, value_enum)]
    role: Option<ReplRole>,
    /// The peer's replication address (its --repl-listen), dialed while this node is primary.
    #[arg(long, requires = "role")]
    peer: Option<SocketAddr>,
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
    /// What the primary does while its peer is away: wait (strict, RPO = 0, no automatic
    /// failover) or continue alone with the witness's consent (degrade) [default: degrade with
    /// --witness, strict without].
    #[arg(long, value_enum, requires = "role")]
    policy: Option<ReplPolicy>,
    /// Do not promote this node automatically when its primary is gone (with a witness, it does
    /// by default).
    #[arg(long, requires = "role")]
    no_auto_failover: bool,
    /// Admin endpoint for `syncblock status`, `promote` and `verify`.
    #[arg(long)]
    admin: Option<SocketAddr>,
}

impl ReplArgs {
    /// The replicated volume these flags describe (if any) and this node's settings.
    fn options(self) -> (Vec<ReplVolume>, ReplNodeOptions) {
        let volume = self.role.map(|role| ReplVolume {
            volume: self.replicate,
            role,
            peer: self.peer,
            listen: self.repl_listen,
            policy: self.policy,
            auto_failover: !self.no_auto_failover,
        });
        let node = ReplNodeOptions {
            node: self.node,
            witness: self.witness,
            timeout_ms: self.repl_timeout_ms,
            admin: self.admin,
        };
        (volume.into_iter().collect(), node)
    }
}

#[derive(Subcommand, Debug)]
enum VolumeCommand {
    Create {
        name: String,
        #[arg(value_parser = size_arg)]
        size: u64,
    },
    List,
    Resize {
        name: String,
        #[arg(value_parser = size_arg)]
        size: u64,
    },
    Delete {
        name: String,
    },
}

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).ok_or_else(|| format!("invalid size {s:?}: use e.g. 10GiB, 512M or 4096"))
}

fn volume_arg(s: &str) -> Result<VolumeSpec, String> {
    VolumeSpec::from_flag(s).map_err(|e| e.to_string())
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            config,
            size,
            volumes,
            listen,
            unix,
            default_export,
            read_only,
            write_through,
            zero_fill,
            repl,
        } => {
            let file = match &config {
                Some(path) => ServeOptions::load(path).with_context(|| format!("config file {}", path.display()))?,
                None => ServeOptions::default(),
            };
            let (replicate, replication) = repl.options();
            let flags = ServeOptions {
                store: cli.store,
                store_bytes: size,
                listen,
                unix,
                default_export,
                volumes,
                read_only,
                replicate,
                replication,
                write_back: write_through.then_some(false),
                zero_fill: zero_fill.then_some(true),
            };
            let settings = file.overridden_by(flags).resolve();
            let rt = runtime(cli.threads)?;
            // The engine locks the store file: a second syncblock on the same store fails to open.
            let store =
                open_or_create(&settings.store, Some((settings.store_bytes, settings.zero_fill)), engine_config(&rt))?;
            let res = rt.block_on(serve(store.clone(), settings));
            // Before the runtime goes: the engine runs on it.
            let closed = store.close().context("closing the store");
            drop(rt);
            res.and(closed)
        }
        Command::Pair { size, listen, data_dir, admin } => {
            let a_path = data_dir.join("pair-primary.img");
            let b_path = data_dir.join("pair-secondary.img");
            let rt = runtime(cli.threads)?;
            let a = open_or_create(&a_path, Some((size, false)), engine_config(&rt))?;
            let b = open_or_create(&b_path, Some((size, false)), engine_config(&rt))?;
            let res = rt.block_on(pair(a.clone(), b.clone(), a_path, size, listen, &data_dir, admin));
            // Before the runtime goes: the engines run on it.
            let closed_a = a.close().context("closing the primary store");
            let closed_b = b.close().context("closing the secondary store");
            drop(rt);
            res.and(closed_a).and(closed_b)
        }
        Command::Witness { listen, state, lease_ms } => {
            let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
            rt.block_on(async {
                if let Some(dir) = state.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
                }
                let l =
                    tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listening on {listen}"))?;
                println!("witness on {}", l.local_addr()?);
                use std::io::Write as _;
                let _ = std::io::stdout().flush();
                let lease = std::time::Duration::from_millis(lease_ms);
                tokio::select! {
                    r = syncblock_replicator::witness::run(syncblock_replicator::net::tcp_listener(l), state, lease) => r.context("witness"),
                    _ = shutdown_signal() => Ok(()),
                }
            })
        }
        Command::Status { admin, volume } => {
            admin_command(admin, &admin_line("status", volume), ADMIN_TIMEOUT, None).map(drop)
        }
        Command::Verify { admin, repair, volume } => {
            let cmd = admin_line(if repair { "verify repair" } else { "verify" }, volume);
            // A pass reads only checksums, but a large volume still takes a while.
            let out = admin_command(admin, &cmd, VERIFY_TIMEOUT, Some("verify failed"))?;
            if !out.contains("\"blocks_differing\":0,") && !repair {
                bail!("the replicas differ (see the ranges above); `syncblock verify --repair` rewrites them from the primary");
            }
            Ok(())
        }
        Command::Promote { admin, force, volume } => {
            let cmd = admin_line(if force { "promote force" } else { "promote" }, volume);
            admin_command(admin, &cmd, ADMIN_TIMEOUT, Some("promotion refused")).map(drop)
        }
        Command::Demote { admin, volume } => {
            admin_command(admin, &admin_line("demote", volume), ADMIN_TIMEOUT, Some("demotion failed")).map(drop)
        }
        Command::Volume { command } => {
            let store =
                open_or_create(cli.store.as_deref().unwrap_or(Path::new(DEFAULT_STORE)), None, Config::default())?;
            let rt = tokio::runtime::Builder::new_current_thread().build().context("starting the runtime")?;
            let res = rt.block_on(volume(&store, command));
            let closed = store.close().context("closing the store");
            res.and(closed)
        }
    }
}

/// The runtime of a `serve` or `pair` process.
///
/// One worker thread for every two CPUs by default. A request costs this process little next to
/// what the kernel spends on it (network stack, io_uring completions) and what the clients on the
/// same machine spend; with a worker per CPU, workers mostly wake one another to hand tasks across
/// (a futex wake and a context switch each time). Measured on the 2-core machine of
/// docs/benchmarks-nbd.md, NBD 4 KiB write+fsync at queue depth 1: 3.6–3.7 k ops/s with one
/// worker, 3.1–3.4 k with two; through a replicated pair (one process per node), 2.9–3.0 k with one
/// worker per process, 2.3–2.7 k with two; random writes at depth 32 were as fast or faster. The
/// same holds for `pair`, which runs both nodes in one process: one worker did 60 k random writes
/// at depth 32 and 3.45 k write+fsync at depth 1 against 53 k and 3.0 k with two (3 rounds each,
/// docs/benchmarks-replication.md).
fn runtime(threads: Option<u16>) -> Result<tokio::runtime::Runtime> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = threads.map_or((cpus / 2).max(1), usize::from);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

/// The engine runs on the server's runtime: a request, its log write and its reply are then
/// handled without a hand-off to a separate engine thread and back.
fn engine_config(rt: &tokio::runtime::Runtime) -> Config {
    Config { driver: Driver::Runtime(rt.handle().clone()), ..Config::default() }
}

/// Opens the store at `path`, or creates it with `create`'s size (and zero fill) if missing.
fn open_or_create(path: &Path, create: Option<(u64, bool)>, cfg: Config) -> Result<Store> {
    if path.exists() {
        return Store::open(path, cfg).with_context(|| format!("opening the store {}", path.display()));
    }
    let Some((size, zero_fill)) = create else {
        bail!("no store at {}; likely cause: wrong --store, or the server never ran; run `syncblock serve` once to create it", path.display());
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let opts = CreateOptions { size_bytes: size, zero_fill, ..CreateOptions::default() };
    tracing::info!("creating a {} store at {}", format_size(size), path.display());
    Store::create(path, &opts, cfg).with_context(|| format!("creating the store {}", path.display()))
}

async fn pair(
    a: Store,
    b: Store,
    a_path: PathBuf,
    size: u64,
    listen: SocketAddr,
    data_dir: &Path,
    admin: Option<SocketAddr>,
) -> Result<()> {
    let timeout = std::time::Duration::from_millis(DEFAULT_REPL_TIMEOUT_MS);
    let state_path = data_dir.join("witness.state");
    reseed_pair_witness(&a, &state_path).await?;
    let wl = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("binding the witness port")?;
    let witness = wl.local_addr()?;
    let witness_task = tokio::spawn(syncblock_replicator::witness::run(
        syncblock_replicator::net::tcp_listener(wl),
        state_path,
        syncblock_replicator::witness::DEFAULT_LEASE,
    ));
    println!("witness (in-process) on {witness}");
    if b.volume(DEFAULT_VOLUME).await.is_err() {
        b.create_volume(DEFAULT_VOLUME, size).await.context("creating the secondary's volume")?;
    }
    let loopback: SocketAddr = "127.0.0.1:0".parse().expect("address");
    // Both nodes die together here, so neither takes over from the other automatically.
    let ncfg = syncblock_replicator::NodeConfig {
        volume: DEFAULT_VOLUME.into(),
        repl_listen: loopback,
        peer: loopback,
        auto_failover: false,
        repl: repl_config("secondary", Some(witness), timeout, None),
    };
    let sec = syncblock_replicator::Node::start(b, ncfg, syncblock_replicator::Role::Secondary)
        .await
        .context("starting the secondary")?;
    let Some(sec_addr) = sec.repl_addr() else {
        sec.stop().await;
        witness_task.abort();
        bail!("the secondary store records this node as primary; likely cause: it was promoted; serve it with `syncblock serve --store {}`", data_dir.join("pair-secondary.img").display());
    };
    println!("secondary (in-process) accepting replication on {sec_addr}");
    let mut opts = ServeOptions {
        store: Some(a_path),
        store_bytes: Some(size),
        listen: Some(listen),
        volumes: vec![VolumeSpec { name: DEFAULT_VOLUME.into(), size_bytes: size }],
        replicate: vec![ReplVolume {
            volume: Some(DEFAULT_VOLUME.into()),
            role: ReplRole::Primary,
            peer: Some(sec_addr),
            listen: None,
            policy: None,
            auto_failover: false,
        }],
        ..ServeOptions::default()
    };
    opts.replication =
        ReplNodeOptions { node: Some(PAIR_PRIMARY_NODE.into()), witness: Some(witness), timeout_ms: None, admin };
    let res = serve(a, opts.resolve()).await;
    sec.stop().await;
    witness_task.abort();
    res
}

/// A pair whose stores have history but whose witness has no state file (deleted, or the stores
/// predate the pair's witness): the witness would refuse the primary a new epoch ("nothing
/// registered"), and the pair would come up with no primary. This process owns both nodes and the
/// witness, so it knows the truth the witness lost: the primary store's node is the primary, in
/// its recorded epoch. (A standalone `syncblock witness` that loses its state never guesses: an
/// operator decides, with `syncblock promote --force`.)
async fn reseed_pair_witness(primary: &Store, state_path: &Path) -> Result<()> {
    if state_path.exists() {
        return Ok(());
    }
    let Ok(v) = primary.volume(DEFAULT_VOLUME).await else { return Ok(()) };
    let Some(st) = syncblock_replicator::ReplState::decode(&v.attr) else { return Ok(()) };
    if st.epoch == 0 || st.role != syncblock_replicator::Role::Primary {
        return Ok(());
    }
    use syncblock_replicator::witness::{Record, WitnessState};
    let record =
        Record { volume: DEFAULT_VOLUME.into(), epoch: st.epoch, primary: PAIR_PRIMARY_NODE.into(), solo: false };
    let mut records = WitnessState::default();
    if st.pair == 0 {
        // Stores from before pair ids: the witness binds the record to the pair at its first
        // report.
        records.unbound.insert(DEFAULT_VOLUME.into(), record);
    } else {
        records.pairs.insert(st.pair, record);
    }
    syncblock_replicator::witness::save(state_path, &records)
        .with_context(|| format!("writing the witness state {}", state_path.display()))?;
    tracing::warn!(
        "the pair's witness had no state; recorded the primary store's epoch {} in {}",
        st.epoch,
        state_path.display()
    );
    Ok(())
}

/// A node's replication settings; `policy` not given is the default for it (degrade with a
/// witness, strict without).
fn repl_config(
    node: &str,
    witness: Option<SocketAddr>,
    timeout: std::time::Duration,
    policy: Option<ReplPolicy>,
) -> syncblock_replicator::ReplConfig {
    let defaults = syncblock_replicator::ReplConfig::default();
    syncblock_replicator::ReplConfig {
        node: node.into(),
        timeout,
        // Eight heartbeats per timeout, and never fewer than the default's: the heartbeat also
        // renews the witness's lease.
        heartbeat: (timeout / 8).clamp(std::time::Duration::from_millis(10), defaults.heartbeat),
        witness,
        policy: match policy {
            Some(ReplPolicy::Strict) => syncblock_replicator::Policy::Strict,
            Some(ReplPolicy::Degrade) => syncblock_replicator::Policy::Degrade,
            None => syncblock_replicator::Policy::default_for(witness.is_some()),
        },
        ..defaults
    }
}

async fn serve(store: Store, settings: ServeSettings) -> Result<()> {
    let store_size = settings.store_bytes;
    for v in &settings.volumes {
        let (name, size) = (v.name.as_str(), v.size_bytes);
        match store.volume(name).await {
            Ok(v) if v.size_bytes != size => tracing::warn!(
                "volume {name} exists with size {}, not {}; use `syncblock volume resize`",
                format_size(v.size_bytes),
                format_size(size)
            ),
            Ok(_) => {}
            Err(_) => {
                store.create_volume(name, size).await.with_context(|| format!("creating volume {name}"))?;
            }
        }
    }
    let mut list = store.list_volumes().await?;
    if list.is_empty() {
        store.create_volume(DEFAULT_VOLUME, store_size).await.context("creating the default volume")?;
        list = store.list_volumes().await?;
    }
    let default_export = settings.default_export.clone().or_else(|| list.first().map(|v| v.name.clone()));
    // Every node started is stopped on the way out, also when a later one fails to start.
    let mut nodes = Vec::new();
    let res = match start_replication(&store, &settings, default_export.as_deref(), &mut nodes).await {
        Ok(replicated) => serve_nbd(store, &list, &settings, default_export, replicated, &nodes).await,
        Err(e) => Err(e),
    };
    stop_all(&nodes).await;
    res
}

/// Starts a replication node for each replicated volume (pushed to `nodes` as it starts) and the
/// admin endpoint; returns the nodes by volume, for the NBD server.
async fn start_replication(
    store: &Store,
    settings: &ServeSettings,
    default_export: Option<&str>,
    nodes: &mut Vec<syncblock_replicator::Node>,
) -> Result<std::collections::HashMap<syncblock_engine::VolumeId, syncblock_replicator::Node>> {
    let mut replicated = std::collections::HashMap::new();
    let timeout = std::time::Duration::from_millis(settings.repl_timeout_ms);
    for (name, r) in settings.replicated_volumes(default_export)? {
        let unset: SocketAddr = "127.0.0.1:0".parse().expect("address");
        let ncfg = syncblock_replicator::NodeConfig {
            volume: name.clone(),
            repl_listen: r.listen.unwrap_or(unset),
            peer: r.peer.unwrap_or(unset),
            auto_failover: settings.witness.is_some() && r.auto_failover,
            repl: repl_config(&settings.node, settings.witness, timeout, r.policy),
        };
        let initial = match r.role {
            ReplRole::Primary => syncblock_replicator::Role::Primary,
            ReplRole::Secondary => syncblock_replicator::Role::Secondary,
        };
        let vol = store.volume(&name).await.with_context(|| {
            format!("volume {name} to replicate; likely cause: a typo in --replicate or the config file, or the volume was never created (add it with --volume {name}:SIZE)")
        })?;
        let n = syncblock_replicator::Node::start(store.clone(), ncfg, initial)
            .await
            .with_context(|| format!("starting replication of {name}"))?;
        nodes.push(n.clone());
        match n.repl_addr() {
            Some(at) => println!("replicating {name} as secondary on {at}"),
            None => println!("replicating {name} as primary to {}", r.peer.unwrap_or(unset)),
        }
        replicated.insert(vol.id, n);
    }
    if let Some(at) = settings.admin {
        if nodes.is_empty() {
            tracing::warn!(
                "--admin without a replicated volume: the admin endpoint serves replication only; not started"
            );
        } else {
            let l = tokio::net::TcpListener::bind(at).await.with_context(|| format!("admin endpoint {at}"))?;
            println!("admin endpoint on {}", l.local_addr()?);
            tokio::spawn(admin_loop(l, nodes.clone()));
        }
    }
    Ok(replicated)
}

async fn stop_all(nodes: &[syncblock_replicator::Node]) {
    for n in nodes {
        n.stop().await;
    }
}

async fn serve_nbd(
    store: Store,
    list: &[syncblock_engine::VolumeInfo],
    settings: &ServeSettings,
    default_export: Option<String>,
    replicated: std::collections::HashMap<syncblock_engine::VolumeId, syncblock_replicator::Node>,
    nodes: &[syncblock_replicator::Node],
) -> Result<()> {
    let (listen, unix, read_only) = (settings.listen, settings.unix.clone(), settings.read_only.clone());
    let tcp = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listening on {listen}"))?;
    let addr = tcp.local_addr()?;
    let mut listeners = vec![Listener::Tcp(tcp)];
    if let Some(path) = &unix {
        let _ = std::fs::remove_file(path);
        let l = tokio::net::UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))?;
        listeners.push(Listener::Unix(l, path.clone()));
    }
    for v in list {
        println!(
            "nbd://{addr}/{}  ({}{})",
            v.name,
            format_size(v.size_bytes),
            if replicated.get(&v.id).is_some_and(|n| !n.is_primary()) {
                ", read-only while secondary"
            } else if read_only.contains(&v.name) {
                ", read-only"
            } else {
                ""
            }
        );
        if let Some(p) = &unix {
            println!("nbd+unix:///{}?socket={}", v.name, p.display());
        }
    }
    if let Some(d) = &default_export {
        println!("nbd://{addr}  (default export: {d})");
    }
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    let write_back = settings.write_back;
    let config = ServerConfig { default_export, read_only, replicated, write_back, ..ServerConfig::default() };
    let nodes = nodes.to_vec();
    let shutdown = async move {
        shutdown_signal().await;
        // The server now finishes the requests in flight; a write waiting for an absent peer
        // (strict policy, or no solo grant) would hold that forever. After the grace period,
        // replication stops and such writes fail (ESHUTDOWN): never acknowledged, never hung.
        if !nodes.is_empty() {
            tokio::spawn(async move {
                tokio::time::sleep(SHUTDOWN_GRACE).await;
                tracing::warn!(
                    "still finishing requests {SHUTDOWN_GRACE:?} after the stop signal: stopping replication; \
                     writes still waiting for the peer fail"
                );
                stop_all(&nodes).await;
            });
        }
    };
    syncblock_nbd::serve(store, config, listeners, shutdown).await?;
    Ok(())
}

/// How long a stopping node lets requests in flight finish before it fails those still waiting
/// for the peer: long enough for a healthy peer's acknowledgements and a resync's last window,
/// short enough for a supervisor's stop timeout (systemd's default is 90 s).
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// How long `status` and `promote` wait for the node's answer.
const ADMIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// How long `verify` waits: a pass compares checksums only (about 1 GB of volume per few ms
/// on loopback), but a large volume on a busy pair can take minutes.
const VERIFY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

/// An admin command line: the command, then ` volume=NAME` to pick a replicated volume.
fn admin_line(cmd: &str, volume: Option<String>) -> String {
    match volume {
        Some(v) => format!("{cmd} volume={v}"),
        None => cmd.to_string(),
    }
}

/// Serves `status`, `promote [force]`, `demote` and `verify [repair]`, each optionally followed by
/// `volume=NAME`, one line per connection. `status` answers with a JSON object per replicated
/// volume, one per line; the others with one JSON object, and need `volume=` when the node
/// replicates more than one volume.
async fn admin_loop(listener: tokio::net::TcpListener, nodes: Vec<syncblock_replicator::Node>) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let nodes = std::sync::Arc::new(nodes);
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let nodes = nodes.clone();
        tokio::spawn(async move {
            let (rd, mut wr) = stream.into_split();
            let mut line = String::new();
            // One short command line; a bounded read so a silent client cannot hold the task.
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                BufReader::new(rd.take(256)).read_line(&mut line).await
            })
            .await;
            if !matches!(read, Ok(Ok(_))) {
                return;
            }
            let answer = admin_answer(&nodes, line.trim_end_matches(['\r', '\n'])).await;
            let _ = wr.write_all(format!("{answer}\n").as_bytes()).await;
        });
    }
}

fn names(nodes: &[syncblock_replicator::Node]) -> String {
    nodes.iter().map(|n| n.volume()).collect::<Vec<_>>().join(", ")
}

async fn admin_answer(nodes: &[syncblock_replicator::Node], line: &str) -> String {
    let err = |msg: String| format!("{{\"ok\":false,\"error\":{msg:?}}}");
    let (cmd, volume) = match line.split_once(" volume=") {
        Some((c, v)) => (c.trim(), Some(v)),
        None => (line.trim(), None),
    };
    let chosen: Vec<&syncblock_replicator::Node> = match volume {
        Some(v) => match nodes.iter().find(|n| n.volume() == v) {
            Some(n) => vec![n],
            None => {
                return err(format!("volume {v} is not replicated by this node (it replicates {})", names(nodes)));
            }
        },
        None => nodes.iter().collect(),
    };
    if cmd == "status" {
        let mut out = Vec::new();
        for n in chosen {
            out.push(n.status().await.to_json());
        }
        return out.join("\n");
    }
    let node = match chosen[..] {
        [n] => n,
        _ => {
            return err(format!("this node replicates {}: name one with --volume", names(nodes)));
        }
    };
    match cmd {
        "promote" | "promote force" => match node.promote(cmd.ends_with("force")).await {
            Ok(epoch) => format!("{{\"ok\":true,\"volume\":{:?},\"epoch\":{epoch}}}", node.volume()),
            Err(e) => err(e.to_string()),
        },
        "demote" => match node.demote().await {
            Ok(()) => format!("{{\"ok\":true,\"volume\":{:?},\"role\":\"secondary\"}}", node.volume()),
            Err(e) => err(e.to_string()),
        },
        "verify" | "verify repair" => match node.verify(cmd.ends_with("repair")).await {
            Ok(report) => format!("{{\"ok\":true,\"volume\":{:?},\"verify\":{}}}", node.volume(), report.to_json()),
            Err(e) => err(e.to_string()),
        },
        other => err(format!("unknown command {other:?}")),
    }
}

/// Sends one admin command from the CLI, prints the answer and returns it; with `refused`, an
/// answer saying `"ok":false` is that error.
fn admin_command(admin: SocketAddr, line: &str, timeout: std::time::Duration, refused: Option<&str>) -> Result<String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let out = rt.block_on(admin_call(admin, line, timeout))?;
    println!("{out}");
    if let Some(what) = refused.filter(|_| out.contains("\"ok\":false")) {
        bail!("{what}");
    }
    Ok(out)
}

/// Sends one admin command and returns the answer (one JSON object per line).
async fn admin_call(admin: SocketAddr, cmd: &str, timeout: std::time::Duration) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(admin).await?;
        // Something else on the port may close before reading the command, or answer first.
        let _ = s.write_all(format!("{cmd}\n").as_bytes()).await;
        let mut out = Vec::new();
        // Reading stops at the bound, or when the peer closes; a connection reset after an
        // answer of another protocol still leaves that answer to be judged.
        let _ = (&mut s).take(ADMIN_ANSWER_MAX_BYTES).read_to_end(&mut out).await;
        Ok::<_, std::io::Error>(out)
    };
    let out = tokio::time::timeout(timeout, fut)
        .await
        .with_context(|| format!("admin endpoint {admin} did not answer"))?
        .with_context(|| {
            format!("talking to the admin endpoint {admin}; likely cause: the node is not running or has no --admin")
        })?;
    admin_answer_text(admin, &out)
}

/// Longest admin answer read: a status line per replicated volume, a verify report's ranges.
const ADMIN_ANSWER_MAX_BYTES: u64 = 1 << 20;

/// The admin answer in `bytes`, or why it is not one: every answer is one or more JSON objects,
/// one per line, so anything else (an NBD greeting, a witness or a replication port closing on
/// the command) is another service on that port.
fn admin_answer_text(admin: SocketAddr, bytes: &[u8]) -> Result<String> {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    let is_object = |l: &str| l.starts_with('{') && l.ends_with('}');
    if !text.is_empty() && text.lines().all(is_object) {
        return Ok(text.to_string());
    }
    let seen = if text.is_empty() {
        "it closed the connection without answering".to_string()
    } else {
        let shown: String = text.chars().take(40).map(|c| if c.is_control() { '.' } else { c }).collect();
        format!("it answered {shown:?}")
    };
    bail!(
        "{admin} is not a syncblock admin endpoint ({seen}); likely cause: --admin points at the NBD, \
         replication or witness port instead of the node's --admin address"
    )
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot watch SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

async fn volume(store: &Store, command: VolumeCommand) -> Result<()> {
    match command {
        VolumeCommand::Create { name, size } => {
            let v = store.create_volume(&name, size).await?;
            println!("created {} ({})", v.name, format_size(v.size_bytes));
        }
        VolumeCommand::List => {
            for v in store.list_volumes().await? {
                println!("{}\t{}\t{} mapped", v.name, format_size(v.size_bytes), format_size(v.mapped_bytes));
            }
        }
        VolumeCommand::Resize { name, size } => {
            let v = store.volume(&name).await?;
            store.resize_volume(v.id, size).await?;
            println!("resized {name} to {}", format_size(size));
        }
        VolumeCommand::Delete { name } => {
            let v = store.volume(&name).await?;
            store.delete_volume(v.id).await?;
            println!("deleted {name}");
        }
    }
    store.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_that_is_not_json_lines_comes_from_another_service() {
        let at: SocketAddr = "127.0.0.1:7200".parse().unwrap();
        let status = "{\"role\":\"primary\"}\n{\"role\":\"secondary\"}\n";
        assert_eq!(admin_answer_text(at, status.as_bytes()).unwrap(), status.trim());
        // An NBD server's greeting, a port that closes without a word, a witness's binary refusal.
        for other in [&b"NBDMAGICIHAVEOPT\x00\x03"[..], b"", b"SBRP\x04\x00\x03\x00"] {
            let e = admin_answer_text(at, other).unwrap_err().to_string();
            assert!(e.contains("is not a syncblock admin endpoint") && e.contains("--admin"), "{e}");
        }
    }
}
