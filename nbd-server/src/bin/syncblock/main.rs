//! `syncblock`: serve engine volumes over NBD (`serve`), run a demonstration pair (`pair`) or a
//! witness, talk to a node's admin endpoint (`status`, `promote`, `demote`, `verify`), and manage
//! volumes offline (`volume`).
//!
//! - `cli.rs`: the command line.
//! - `main.rs` (this file): `serve`: settings, the store, replication, the admin endpoint, NBD.
//! - `pair.rs`: `pair`.
//! - `client.rs`: the admin endpoint's client commands and the human-readable status.
//! - `notify.rs`: readiness and stop notifications for systemd (`Type=notify`).

mod cli;
mod client;
mod cluster;
mod heap;
mod notify;
mod pair;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Parser;
use syncblock_engine::{Config, CreateOptions, Driver, Store, BLOCK_BYTES_U64};
use syncblock_nbd::admin::Admin;
use syncblock_nbd::config::{ReplPolicy, ReplRole, ServeOptions, ServeSettings, DEFAULT_STORE};
use syncblock_nbd::metrics::Metrics;
use syncblock_nbd::size::format_size;
use syncblock_nbd::{Listener, ServerConfig};

use cli::{Cli, Command, VolumeCommand};

const DEFAULT_VOLUME: &str = "default";

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file or the journal gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            store,
            create,
            config,
            size,
            volumes,
            listen,
            unix,
            default_export,
            read_only,
            write_through,
            zero_fill,
            admin,
            tls,
            tls_files,
            allow,
            admin_allow,
            insecure,
            repl,
            threads,
        } => {
            let file = match &config {
                Some(path) => ServeOptions::load(path).with_context(|| format!("config file {}", path.display()))?,
                None => ServeOptions::default(),
            };
            let (replicate, replication) = repl.options(admin);
            let flags = ServeOptions {
                tls: tls_files.files(),
                tls_mode: tls,
                access: allow,
                admin_access: admin_allow,
                insecure: insecure.then_some(true),
                store,
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
                create: create.then_some(true),
            };
            let settings = file.overridden_by(flags).resolve();
            let rt = runtime(threads.threads)?;
            run_serve(&rt, settings)
        }
        Command::Pair { size, listen, data_dir, admin, threads } => {
            let rt = runtime(threads.threads)?;
            pair::run(&rt, size, listen, &data_dir, admin)
        }
        Command::Witness { listen, state, lease_ms, tls_files, allow, insecure } => {
            let files = tls_files.files();
            let tls = if files.is_empty() { None } else { Some(syncblock_replicator::tls::Tls::load(&files, None)?) };
            let allow = syncblock_replicator::witness::Allow::parse(&allow).map_err(anyhow::Error::msg)?;
            if !allow.is_empty() && !tls.as_ref().is_some_and(|t| t.authenticates()) {
                anyhow::bail!(
                    "--allow names nodes, but they prove no identity to this witness: give --tls-ca (node \
                     certificates) or --tls-psk"
                );
            }
            syncblock_nbd::config::check_exposed(
                "the witness",
                listen,
                syncblock_nbd::config::WITNESS_RISK,
                tls.as_ref().is_some_and(|t| t.authenticates()),
                insecure,
            )?;
            let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
            rt.block_on(async {
                let stop = shutdown_signal();
                if let Some(dir) = state.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
                }
                let l =
                    tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listening on {listen}"))?;
                println!("witness on {}", l.local_addr()?);
                use std::io::Write as _;
                let _ = std::io::stdout().flush();
                notify::ready(&format!("witness on {}", l.local_addr()?));
                let lease = std::time::Duration::from_millis(lease_ms);
                tracing::info!(
                    "witness: lease {lease:?} (a primary silent for {:?} may be replaced), state in {}",
                    lease * 3 / 2,
                    state.display()
                );
                tokio::select! {
                    r = syncblock_replicator::witness::run(with_tls(syncblock_replicator::net::tcp_listener(l), tls), state, lease, allow) => r.context("witness"),
                    _ = stop => Ok(()),
                }
            })
        }
        Command::Status { admin, volume, json, wait_sync, wait_max, tls } => {
            let admin = tls.admin_at(admin)?;
            if wait_sync {
                client::wait_sync(&admin, volume.as_deref(), std::time::Duration::from_secs(wait_max))?;
            }
            client::status(&admin, volume.as_deref(), json)
        }
        Command::Verify { admin, repair, volume, json, tls } => {
            client::verify(&tls.admin_at(admin)?, volume.as_deref(), repair, json)
        }
        Command::Promote { admin, force, volume, tls } => {
            client::promote(&tls.admin_at(admin)?, volume.as_deref(), force)
        }
        Command::Demote { admin, volume, tls } => client::demote(&tls.admin_at(admin)?, volume.as_deref()),
        Command::Switchover { admin, volume, tls } => client::switchover(&tls.admin_at(admin)?, volume.as_deref()),
        Command::Volume { etcd: Some(etcd), etcd_tls, command, .. } => {
            cluster::volume_command(&etcd, etcd_tls.tls(), command)
        }
        Command::Node { command: Some(command), .. } => cluster::node_command(command),
        Command::Node { command: None, run } => cluster::run_node(run),
        Command::Volume { store, etcd: None, command, .. } => {
            let path = store.unwrap_or_else(|| PathBuf::from(DEFAULT_STORE));
            let fix = format!("create one with `syncblock serve --create --store {}`", path.display());
            let store = open_existing(&path, Config::default(), &fix)?;
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
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers(threads))
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

/// The runtime's worker threads: `--threads`, or half the CPUs (at least one).
fn workers(threads: Option<u16>) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    threads.map_or((cpus / 2).max(1), usize::from)
}

/// The engine runs on the server's runtime: a request, its log write and its reply are then
/// handled without a hand-off to a separate engine thread and back.
fn engine_config(rt: &tokio::runtime::Runtime) -> Config {
    Config { driver: Driver::Runtime(rt.handle().clone()), ..Config::default() }
}

/// A store being created: it lives at `temp` until everything that can fail before serving has
/// succeeded, then [`NewStore::commit`] renames it to `path`. Dropped before that, it removes the
/// temporary file, so a failed start leaves nothing behind that a retry would mistake for a store.
pub struct NewStore {
    temp: PathBuf,
    path: PathBuf,
    committed: bool,
}

impl NewStore {
    pub fn commit(&mut self) -> Result<()> {
        std::fs::rename(&self.temp, &self.path)
            .with_context(|| format!("renaming {} to {}", self.temp.display(), self.path.display()))?;
        // The rename is durable once the directory is.
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        self.committed = true;
        tracing::info!("created the store {}", self.path.display());
        Ok(())
    }
}

impl Drop for NewStore {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// Checks a size for a new store before anything is created: the minimum the format needs, the
/// maximum its 32-bit block numbers reach.
fn check_store_size(size: u64) -> Result<()> {
    let min = syncblock_engine::min_store_bytes(syncblock_engine::DEFAULT_SEGMENT_BYTES);
    if size < min {
        bail!("--size {size} is too small for a store: the minimum is {min} bytes ({})", format_size(min));
    }
    if size > syncblock_engine::STORE_BYTES_MAX {
        bail!("--size {} is too large: a store holds at most 16 TiB; use several stores", format_size(size));
    }
    Ok(())
}

/// A volume's size must be a whole number of blocks; the message offers the nearest sizes that are.
fn check_volume_size(name: &str, size: u64) -> Result<()> {
    if size == 0 || size % BLOCK_BYTES_U64 != 0 {
        let below = size / BLOCK_BYTES_U64 * BLOCK_BYTES_U64;
        bail!(
            "volume {name}: {size} bytes is not a whole number of {BLOCK_BYTES_U64}-byte blocks; use {} or {} bytes \
             (sizes in KiB, MiB or GiB always are)",
            below.max(BLOCK_BYTES_U64),
            below + BLOCK_BYTES_U64
        );
    }
    Ok(())
}

/// Opens the store at `path`; where there is none, the error names the likely causes and `fix`.
fn open_existing(path: &Path, cfg: Config, fix: &str) -> Result<Store> {
    if !path.exists() {
        bail!(
            "no store at {}; likely cause: a wrong --store path (relative paths start in the working directory), \
             or the store was never created; {fix}",
            path.display()
        );
    }
    Store::open(path, cfg).with_context(|| format!("opening the store {}", path.display()))
}

/// Opens the store at `path`, or, with `create` (size, zero fill), creates it at a temporary path
/// beside it (see [`NewStore`]). A missing store without `create` is an error naming the fix.
pub fn open_or_create(path: &Path, create: Option<(u64, bool)>, cfg: Config) -> Result<(Store, Option<NewStore>)> {
    let Some((size, zero_fill)) = create.filter(|_| !path.exists()) else {
        // The store there (or an error naming the fix), unless `--create` finds a block device
        // that holds none yet: then it formats the device.
        let store = match open_existing(path, cfg.clone(), "to create it, add --create (and --size)") {
            Ok(store) => store,
            Err(e)
                if create.is_some()
                    && is_block_device(path)
                    && matches!(
                        e.downcast_ref::<syncblock_engine::Error>(),
                        Some(syncblock_engine::Error::NotAStore { .. })
                    ) =>
            {
                return format_block_device(path, cfg).map(|s| (s, None));
            }
            Err(e) => return Err(e),
        };
        warn_if_sparse_overcommitted(path, syncblock_nbd::admin::device_bytes(path).unwrap_or(0));
        return Ok((store, None));
    };
    check_store_size(size)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "store".into());
    let temp = path.with_file_name(format!(".{name}.creating"));
    // A leftover of a start that was killed before it finished.
    let _ = std::fs::remove_file(&temp);
    let new = NewStore { temp, path: path.to_path_buf(), committed: false };
    let opts = CreateOptions { size_bytes: size, zero_fill, ..CreateOptions::default() };
    tracing::info!("creating a {} store at {}", format_size(size), path.display());
    let store =
        Store::create(&new.temp, &opts, cfg).with_context(|| format!("creating the store {}", path.display()))?;
    warn_if_sparse_overcommitted(&new.temp, size);
    Ok((store, Some(new)))
}

fn is_block_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

/// How much of a block device must read as zeros before `--create` formats it: enough to cover
/// the partition tables, file system and LVM signatures that `wipefs` knows (all within the first
/// MiB), so a typo in a device name never formats a disk that holds something.
const BLANK_CHECK_BYTES: usize = 1 << 20;

/// `--create` on a block device that holds no store: formats the whole device, but only if its
/// first MiB is blank.
fn format_block_device(path: &Path, cfg: Config) -> Result<Store> {
    use std::io::Read;
    let mut head = vec![0u8; BLANK_CHECK_BYTES];
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let n = f.read(&mut head).with_context(|| format!("reading {}", path.display()))?;
    if head[..n].iter().any(|&b| b != 0) {
        bail!(
            "{} holds data but no syncblock store, so --create will not format it; likely cause: a wrong device \
             name; if this device is the right one and its data is not needed, wipe it first (`wipefs -a {0}` or \
             `blkdiscard {0}`)",
            path.display()
        );
    }
    tracing::warn!(
        "formatting the blank block device {} as a new store (all of it; --size is ignored)",
        path.display()
    );
    // Size 0: the whole device.
    let opts = CreateOptions { size_bytes: 0, ..CreateOptions::default() };
    Store::create(path, &opts, cfg).with_context(|| format!("formatting {} as a store", path.display()))
}

/// Warns when a sparse store file could outgrow its file system's free space.
fn warn_if_sparse_overcommitted(path: &Path, size: u64) {
    let short = syncblock_nbd::admin::backing_shortfall(path);
    if short > 0 {
        tracing::warn!(
            "the store file {} is sparse ({}) and its file system lacks {} of free space to fill it: writes will fail \
             with ENOSPC when it is full (free space, use a smaller --size, or --zero-fill to allocate it now)",
            path.display(),
            format_size(size),
            format_size(short)
        );
    }
}

/// `serve`: everything that can fail before serving is checked (settings, ports) before the store
/// is created, so a failed start creates nothing.
fn run_serve(rt: &tokio::runtime::Runtime, settings: ServeSettings) -> Result<()> {
    let bound = rt.block_on(bind(&settings))?;
    let create = settings.create.then_some((settings.store_bytes, settings.zero_fill));
    // The engine locks the store file: a second syncblock on the same store fails to open.
    let (store, new) = open_or_create(&settings.store, create, engine_config(rt))?;
    let res = rt.block_on(serve(store.clone(), settings, bound, new));
    // Before the runtime goes: the engine runs on it.
    let closed = store.close().context("closing the store");
    res.and(closed)
}

/// The listeners of a `serve` process, bound before anything is created, and its credentials.
struct Bound {
    nbd: Vec<Listener>,
    nbd_addr: SocketAddr,
    admin: Option<tokio::net::TcpListener>,
    tls: Option<Arc<syncblock_replicator::tls::Tls>>,
}

/// A listener whose connections run a TLS server handshake when `tls` is given.
fn with_tls(
    l: syncblock_replicator::net::BoxListener,
    tls: Option<Arc<syncblock_replicator::tls::Tls>>,
) -> syncblock_replicator::net::BoxListener {
    match tls {
        Some(tls) => syncblock_replicator::net::tls_listener(l, tls),
        None => l,
    }
}

async fn bind(settings: &ServeSettings) -> Result<Bound> {
    // Checked first: a bad setting must not leave a new store behind either.
    settings.replicated_volumes(settings.default_export.as_deref().or(Some(DEFAULT_VOLUME)))?;
    settings.check_security()?;
    let tls = if settings.tls.is_empty() {
        None
    } else {
        // A replicating node proves its node name to its peer and witness: its certificate must be
        // for that name and its PSK identity is that name.
        let name = (!settings.replicate.is_empty()).then_some(settings.node.as_str());
        Some(syncblock_replicator::tls::Tls::load(&settings.tls, name).context("TLS credentials")?)
    };
    for v in &settings.volumes {
        check_volume_size(&v.name, v.size_bytes)?;
    }
    let listen = settings.listen;
    let tcp = tokio::net::TcpListener::bind(listen).await.with_context(|| {
        format!("listening on {listen}; likely cause: another server (or another syncblock) uses the port: choose another with --listen")
    })?;
    let nbd_addr = tcp.local_addr()?;
    let mut nbd = vec![Listener::Tcp(tcp)];
    if let Some(path) = &settings.unix {
        let _ = std::fs::remove_file(path);
        let l = tokio::net::UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))?;
        nbd.push(Listener::Unix(l, path.clone()));
    }
    let admin = match settings.admin {
        Some(at) => Some(tokio::net::TcpListener::bind(at).await.with_context(|| {
            format!("admin endpoint {at}; likely cause: the port is in use: choose another with --admin")
        })?),
        None => None,
    };
    Ok(Bound { nbd, nbd_addr, admin, tls })
}

async fn serve(store: Store, settings: ServeSettings, bound: Bound, mut new: Option<NewStore>) -> Result<()> {
    tokio::spawn(crate::heap::trim_heap());
    // The store's file or device: under its temporary name while it is being created.
    let path = new.as_ref().map_or(&settings.store, |n| &n.temp).clone();
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
        // As large as the store file or device (a block device's size, not --size).
        let size = syncblock_nbd::admin::device_bytes(&path).unwrap_or(settings.store_bytes) / BLOCK_BYTES_U64
            * BLOCK_BYTES_U64;
        store.create_volume(DEFAULT_VOLUME, size).await.context("creating the default volume")?;
        list = store.list_volumes().await?;
    }
    warn_overcommit(&store, &path, &list).await;
    let default_export = settings.default_export.clone().or_else(|| list.first().map(|v| v.name.clone()));
    // Every node started is stopped on the way out, also when a later one fails to start.
    let mut nodes = Vec::new();
    let res = async {
        let replicated =
            start_replication(&store, &settings, bound.tls.clone(), default_export.as_deref(), &mut nodes).await?;
        if let Some(new) = &mut new {
            store.flush().await.context("flushing the new store")?;
            new.commit()?;
        }
        serve_nbd(store.clone(), &list, &settings, default_export, replicated, &nodes, bound).await
    }
    .await;
    stop_all(&nodes).await;
    res
}

/// Warns when the volumes together are larger than the store.
async fn warn_overcommit(store: &Store, path: &Path, list: &[syncblock_engine::VolumeInfo]) {
    let Ok(stats) = store.stats().await else { return };
    let capacity = syncblock_nbd::admin::store_size_bytes(path, &stats);
    let provisioned: u64 = list.iter().map(|v| v.size_bytes).sum();
    if provisioned > capacity {
        tracing::warn!(
            "the volumes add up to {} but the store holds {}: writes fail with ENOSPC once it is full \
             (status and the metrics show it as overcommitted)",
            format_size(provisioned),
            format_size(capacity)
        );
    }
}

/// A node's replication settings; `policy` not given is the default for it (degrade with a
/// witness, strict without). The witness is reached over `net`.
pub fn repl_config(
    node: &str,
    net: Arc<dyn syncblock_replicator::net::Net>,
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
        authority: witness.map(|w| syncblock_replicator::authority::Witness::shared(net.clone(), w)),
        net,
        policy: match policy {
            Some(ReplPolicy::Strict) => syncblock_replicator::Policy::Strict,
            Some(ReplPolicy::Degrade) => syncblock_replicator::Policy::Degrade,
            None => syncblock_replicator::Policy::default_for(witness.is_some()),
        },
        ..defaults
    }
}

/// Starts a replication node for each replicated volume (pushed to `nodes` as it starts); returns
/// the nodes by volume, for the NBD server.
async fn start_replication(
    store: &Store,
    settings: &ServeSettings,
    tls: Option<Arc<syncblock_replicator::tls::Tls>>,
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
            repl: syncblock_replicator::ReplConfig {
                peer_node: r.peer_node.clone(),
                // Replication and witness links run TLS with this node's credentials when it has
                // any; the peer, when named, must prove its name.
                ..repl_config(
                    &settings.node,
                    match &tls {
                        Some(tls) => syncblock_replicator::net::TlsNet::expecting(
                            syncblock_replicator::net::tcp(),
                            tls.clone(),
                            r.peer
                                .zip(r.peer_node.clone())
                                .into_iter()
                                .chain(settings.witness.zip(settings.witness_node.clone())),
                        ),
                        None => syncblock_replicator::net::tcp(),
                    },
                    settings.witness,
                    timeout,
                    r.policy,
                )
            },
        };
        tracing::info!(
            "replicating {name} as node {}: policy {}, takes over when its primary is gone: {}, link timeout {:?}, heartbeat {:?}, {}",
            settings.node,
            ncfg.repl.policy.name(),
            if ncfg.auto_failover { "yes" } else { "no" },
            ncfg.repl.timeout,
            ncfg.repl.heartbeat,
            match settings.witness {
                Some(w) => format!("witness {w} (its --lease-ms sets the lease)"),
                None => "no witness".into(),
            }
        );
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
    bound: Bound,
) -> Result<()> {
    let (unix, read_only, tls) = (settings.unix.clone(), settings.read_only.clone(), bound.tls.clone());
    // With TLS required, clients must use the TLS form of the URI.
    let scheme = if settings.tls_mode == syncblock_nbd::handshake::TlsMode::Require { "nbds" } else { "nbd" };
    let addr = bound.nbd_addr;
    let stop_signal = shutdown_signal();
    // Requests are counted only when someone can read the counts.
    let metrics = bound.admin.is_some().then(|| Arc::new(Metrics::new()));
    if let (Some(l), Some(metrics)) = (bound.admin, &metrics) {
        let admin = Arc::new(Admin {
            store: store.clone(),
            store_path: settings.store.clone(),
            node: settings.node.clone(),
            nodes: syncblock_nbd::admin::Nodes::Fixed(nodes.to_vec()),
            read_only: read_only.clone(),
            metrics: metrics.clone(),
            access: settings.admin_access.clone(),
        });
        let at = l.local_addr()?;
        let admin_tls = tls.clone();
        let https = if admin_tls.is_some() { "https" } else { "http" };
        let creds =
            if admin_tls.is_some() { " --tls-cert … --tls-key … --tls-ca … (or --tls-psk …)" } else { "" };
        println!("admin endpoint on {https}://{at}  (`syncblock status --admin {at}{creds}`; Prometheus: /metrics)");
        tokio::spawn(async move {
            if let Err(e) = syncblock_nbd::admin::serve(l, admin, admin_tls).await {
                tracing::error!("the admin endpoint stopped: {e}");
            }
        });
    }
    for v in list {
        println!(
            "{scheme}://{addr}/{}  ({}{})",
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
            println!("{scheme}+unix:///{}?socket={}", v.name, p.display());
        }
    }
    if let Some(d) = &default_export {
        println!("{scheme}://{addr}  (default export: {d})");
    }
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    let write_back = settings.write_back;
    let config = ServerConfig {
        default_export,
        read_only,
        replicated,
        write_back,
        metrics: metrics.map(|m| m.io.clone()),
        tls: tls.clone(),
        tls_mode: settings.tls_mode,
        access: settings.access.clone(),
        ..ServerConfig::default()
    };
    let nodes = nodes.to_vec();
    let shutdown = async move {
        stop_signal.await;
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
    notify::ready(&format!("serving {} volume(s) on nbd://{addr}", list.len()));
    syncblock_nbd::serve(store, config, bound.nbd, shutdown).await?;
    Ok(())
}

/// How long a stopping node lets requests in flight finish before it fails those still waiting
/// for the peer: long enough for a healthy peer's acknowledgements and a resync's last window,
/// short enough for a supervisor's stop timeout (systemd's default is 90 s).
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Resolves on SIGTERM or SIGINT, then tells the service manager the process is stopping. The handlers are installed when this is called, not when the
/// future is first polled: a stop signal that arrives once the process has said it is ready (its
/// URIs printed) must stop it cleanly, not kill it.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            (t, i) => {
                tracing::error!(
                    "cannot watch the stop signals ({:?}, {:?}); stopping on Ctrl-C only",
                    t.err(),
                    i.err()
                );
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        notify::stopping();
    }
}

async fn volume(store: &Store, command: VolumeCommand) -> Result<()> {
    match command {
        VolumeCommand::Create { name, size, size_flag, .. } => {
            let size = size.or(size_flag).context("give the volume's size")?;
            let v = store.create_volume(&name, size).await?;
            println!("created {} ({})", v.name, format_size(v.size_bytes));
        }
        VolumeCommand::List { .. } => {
            for v in store.list_volumes().await? {
                println!("{}\t{}\t{} mapped", v.name, format_size(v.size_bytes), format_size(v.mapped_bytes));
            }
        }
        VolumeCommand::Resize { name, size } => {
            let v = store.volume(&name).await?;
            store.resize_volume(v.id, size).await?;
            println!("resized {name} to {}", format_size(size));
        }
        VolumeCommand::Switchover { .. } => {
            bail!("a store's volumes are not replicated: switch over a cluster volume with --etcd, or a pair's with `syncblock switchover --admin`")
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
