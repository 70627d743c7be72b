//! Cluster mode's commands (docs/cluster.md): `node` runs a cluster node, `node list`, and
//! `volume create|list|delete --etcd`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use syncblock_nbd::config::{check_exposed, ADMIN_RISK, NBD_RISK, REPLICATION_RISK};
use syncblock_nbd::handshake::TlsMode;
use syncblock_nbd::metrics::Metrics;
use syncblock_nbd::server::{Listener, ServerConfig};
use syncblock_nbd::size::format_size;
use syncblock_nbd::target::Directory;
use syncblock_replicator::cluster::member::{Member, MemberConfig, DEFAULT_TTL};
use syncblock_replicator::cluster::{plan, Cluster, MemberInfo};
use syncblock_replicator::Node;

use crate::cli::{NodeArgs, NodeCommand, VolumeCommand};

/// The NBD server's view of the cluster: it serves a volume while this node is its primary.
#[derive(Clone)]
struct ClusterDirectory(Member);

impl std::fmt::Debug for ClusterDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClusterDirectory({})", self.0.name())
    }
}

impl Directory for ClusterDirectory {
    fn node(&self, volume: &str) -> Option<Node> {
        self.0.node(volume)
    }
    fn elsewhere(&self, export: &str) -> Option<String> {
        self.0.served_elsewhere(export)
    }
}

/// The bytes of volume data a store can hold: its log less the segments the cleaner keeps free, so
/// that placement never promises a node more than it can write.
fn capacity(stats: &syncblock_engine::Stats) -> u64 {
    u64::from(stats.n_segments.saturating_sub(stats.reserved_segments)) * stats.segment_bytes
}

/// A cluster node holds many volumes, each with a few small, long-lived buffers and tasks that run
/// on whichever thread is free; glibc gives every thread that allocates an arena of its own (up to
/// eight per CPU), and each arena keeps freed memory, so with the default an idle replicated volume
/// cost a node 83–89 KiB of RSS (benches/cluster-failover.sh, 200 volumes on 4 nodes), against
/// 52–54 KiB with one arena per worker thread (two per worker: 71–75 KiB). The engine and the
/// network run on the workers, so they are the threads that allocate; the blocking pool's threads
/// share the arenas.
fn limit_malloc_arenas(threads: Option<u16>) {
    let arenas = crate::workers(threads).clamp(1, 64) as libc::c_int;
    // SAFETY: mallopt only sets a tuning parameter of glibc's allocator, before threads start.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
}

pub fn run_node(args: NodeArgs) -> Result<()> {
    let Some(etcd) = args.etcd.clone() else { bail!("syncblock node needs --etcd (the cluster's etcd endpoints)") };
    let Some(name) = args.name.clone() else { bail!("syncblock node needs --name (this node's name in the cluster)") };
    syncblock_replicator::cluster::check_name("node", &name)?;
    let tls_files = args.tls.files();
    let tls_on = !tls_files.is_empty();
    let authenticates = tls_files.authenticates();
    check_exposed("NBD", args.listen, NBD_RISK, tls_on, args.insecure)?;
    check_exposed("replication", args.repl_listen, REPLICATION_RISK, authenticates, args.insecure)?;
    syncblock_nbd::config::check_admin_access(&args.admin_allow, args.admin.is_some(), authenticates)?;
    if let Some(a) = args.admin {
        check_exposed("admin", a, ADMIN_RISK, authenticates, args.insecure)?;
    }
    let tls = if tls_on {
        Some(syncblock_replicator::tls::Tls::load(&tls_files, Some(&name)).context("TLS credentials")?)
    } else {
        None
    };
    let path = args.store.clone().unwrap_or_else(|| PathBuf::from(format!("syncblock-data/{name}.img")));
    limit_malloc_arenas(args.threads.threads);
    let rt = crate::runtime(args.threads.threads)?;
    let (store, mut new) = crate::open_or_create(&path, Some((args.size, false)), crate::engine_config(&rt))?;
    if let Some(n) = &mut new {
        rt.block_on(store.flush()).context("flushing the new store")?;
        n.commit()?;
    }
    let res = rt.block_on(node(store.clone(), path, args, etcd, name, tls));
    let closed = store.close().context("closing the store");
    res.and(closed)
}

async fn node(
    store: syncblock_engine::Store,
    path: PathBuf,
    args: NodeArgs,
    etcd: String,
    name: String,
    tls: Option<Arc<syncblock_replicator::tls::Tls>>,
) -> Result<()> {
    tokio::spawn(crate::heap::trim_heap());
    let nbd = tokio::net::TcpListener::bind(args.listen).await.with_context(|| {
        format!("NBD listener {}; likely cause: the port is in use: choose another with --listen", args.listen)
    })?;
    let repl = tokio::net::TcpListener::bind(args.repl_listen).await.with_context(|| {
        format!(
            "replication listener {}; likely cause: the port is in use: choose another with --repl-listen",
            args.repl_listen
        )
    })?;
    let admin = match args.admin {
        Some(at) => Some(tokio::net::TcpListener::bind(at).await.with_context(|| {
            format!("admin endpoint {at}; likely cause: the port is in use: choose another with --admin")
        })?),
        None => None,
    };
    let nbd_addr = nbd.local_addr()?;
    let stats = store.stats().await?;
    let info = MemberInfo {
        name: name.clone(),
        zone: args.zone.clone(),
        nbd: nbd_addr.to_string(),
        // With credentials the node's NBD listener requires TLS (below).
        tls: tls.is_some(),
        repl: repl.local_addr()?,
        admin: admin.as_ref().map(|l| l.local_addr()).transpose()?,
        capacity: capacity(&stats),
    };
    let cluster = Cluster::connect(&etcd, args.etcd_tls.tls()).await.context("connecting to etcd")?;
    let net = match &tls {
        Some(t) => syncblock_replicator::net::TlsNet::over(syncblock_replicator::net::tcp(), t.clone()),
        None => syncblock_replicator::net::tcp(),
    };
    let repl_cfg = syncblock_replicator::ReplConfig {
        peer_node: None,
        ..crate::repl_config(&name, net, None, Duration::from_secs(1), None)
    };
    let cfg = MemberConfig {
        info,
        ttl: args.lease_ms.map_or(DEFAULT_TTL, Duration::from_millis),
        repl: repl_cfg,
        grace: Duration::from_secs(args.grace),
    };
    let listener = crate::with_tls(syncblock_replicator::net::tcp_listener(repl), tls.clone());
    let member = Member::join(store.clone(), cluster, cfg, listener).await.context("joining the cluster")?;
    let metrics = admin.is_some().then(|| Arc::new(Metrics::new()));
    if let (Some(l), Some(metrics)) = (admin, &metrics) {
        let m = member.clone();
        let a = Arc::new(syncblock_nbd::admin::Admin {
            store: store.clone(),
            store_path: path.clone(),
            node: name.clone(),
            nodes: syncblock_nbd::admin::Nodes::Live(Arc::new(move || m.nodes().into_values().collect())),
            read_only: Vec::new(),
            metrics: metrics.clone(),
            access: args.admin_allow.clone(),
        });
        let admin_tls = tls.clone();
        tokio::spawn(async move {
            if let Err(e) = syncblock_nbd::admin::serve(l, a, admin_tls).await {
                tracing::error!("the admin endpoint stopped: {e}");
            }
        });
    }
    let scheme = if tls.is_some() { "nbds" } else { "nbd" };
    println!("node {name} joined the cluster; NBD on {scheme}://{nbd_addr}/VOLUME for the volumes it is primary of");
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    let config = ServerConfig {
        directory: Some(Arc::new(ClusterDirectory(member.clone()))),
        metrics: metrics.map(|m| m.io.clone()),
        tls: tls.clone(),
        tls_mode: if tls.is_some() { TlsMode::Require } else { TlsMode::Off },
        ..ServerConfig::default()
    };
    let stop_signal = crate::shutdown_signal();
    crate::notify::ready(&format!("node {name} serving on {scheme}://{nbd_addr}"));
    let m = member.clone();
    let shutdown = async move {
        stop_signal.await;
        // Stepping down first: the volumes this node is primary of fail over now, not a lease
        // later, and writes in flight finish or fail instead of waiting for a peer.
        m.stop().await;
    };
    syncblock_nbd::serve(store, config, vec![Listener::Tcp(nbd)], shutdown).await?;
    Ok(())
}

pub fn node_command(command: NodeCommand) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the runtime")?;
    match command {
        NodeCommand::List { etcd, etcd_tls, json } => rt.block_on(async {
            let cluster = Cluster::connect(&etcd, etcd_tls.tls()).await?;
            let views = cluster.snapshot().await?.node_views();
            if json {
                println!("{}", serde_json::to_string_pretty(&views)?);
                return Ok(());
            }
            println!(
                "{:<16} {:<10} {:<6} {:>8} {:>10} {:>12} {:>12}  NBD",
                "NAME", "ZONE", "ALIVE", "VOLUMES", "PRIMARIES", "CAPACITY", "FREE"
            );
            for n in views {
                println!(
                    "{:<16} {:<10} {:<6} {:>8} {:>10} {:>12} {:>12}  {}",
                    n.name,
                    n.zone.as_deref().unwrap_or("-"),
                    if n.alive { "yes" } else { "NO" },
                    n.volumes,
                    n.primaries,
                    format_size(n.capacity),
                    format_size(n.free),
                    n.nbd
                );
            }
            Ok(())
        }),
        NodeCommand::Drain { name, etcd, etcd_tls, admin_tls } => {
            let snap = rt.block_on(async { Cluster::connect(&etcd, etcd_tls.tls()).await?.snapshot().await })?;
            if !snap.members.contains_key(&name) {
                bail!("no node {name} in the cluster (see `syncblock node list`)");
            }
            let (moves, stuck) = plan::drain(&snap, &name);
            for (volume, why) in &stuck {
                println!("{volume}: left on {name}: {why}");
            }
            run_moves(&snap, &moves, &admin_tls)?;
            if !stuck.is_empty() {
                bail!(
                    "{} volume(s) still have their primary on {name}; drain again once they are in sync",
                    stuck.len()
                );
            }
            println!("{name} is primary of no volume now ({} moved)", moves.len());
            Ok(())
        }
        NodeCommand::Balance { etcd, etcd_tls, admin_tls, dry_run } => {
            let snap = rt.block_on(async { Cluster::connect(&etcd, etcd_tls.tls()).await?.snapshot().await })?;
            let moves = plan::balance(&snap);
            if dry_run {
                for m in &moves {
                    println!("{}: {} -> {}", m.volume, m.from, m.to);
                }
                println!("{} move(s) planned", moves.len());
                return Ok(());
            }
            run_moves(&snap, &moves, &admin_tls)?;
            println!("primaries balanced ({} moved)", moves.len());
            Ok(())
        }
        NodeCommand::Remove { name, etcd, etcd_tls } => rt.block_on(async {
            let cluster = Cluster::connect(&etcd, etcd_tls.tls()).await?;
            let volumes = cluster.remove_node(&name).await?;
            if volumes.is_empty() {
                println!("node {name} removed; it held no replica");
            } else {
                println!(
                    "node {name} removed; {} volume(s) get a new replica now (their primaries copy them): {}",
                    volumes.len(),
                    volumes.join(", ")
                );
            }
            Ok(())
        }),
    }
}

/// Switchovers asked at once, each of its primary's admin endpoint: enough to drain a node of
/// hundreds of primaries in seconds, few enough that its admin endpoint (64 connections,
/// `ADMIN_CONNECTIONS_MAX`) always has room for others.
const MOVES_AT_ONCE: usize = 16;

/// Makes `moves`, up to `MOVES_AT_ONCE` at a time, printing each; fails if any was refused.
fn run_moves(
    snap: &syncblock_replicator::cluster::Snapshot,
    moves: &[plan::Move],
    tls: &crate::cli::AdminTls,
) -> Result<()> {
    let failed = std::sync::atomic::AtomicUsize::new(0);
    for chunk in moves.chunks(MOVES_AT_ONCE) {
        std::thread::scope(|scope| {
            for m in chunk {
                let failed = &failed;
                scope.spawn(move || {
                    let r = snap
                        .members
                        .get(&m.from)
                        .and_then(|i| i.admin)
                        .with_context(|| format!("node {} has no admin endpoint (start it with --admin)", m.from))
                        .and_then(|addr| tls.admin_at(addr))
                        .and_then(|at| crate::client::hand_over(&at, Some(&m.volume)));
                    match r {
                        Ok(a) => {
                            println!("{}: {} -> {} (epoch {})", m.volume, m.from, m.to, a.epoch.unwrap_or_default())
                        }
                        Err(e) => {
                            failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            println!("{}: not moved from {}: {e:#}", m.volume, m.from);
                        }
                    }
                });
            }
        });
    }
    match failed.into_inner() {
        0 => Ok(()),
        n => bail!("{n} of {} switchover(s) refused (see above)", moves.len()),
    }
}

pub fn volume_command(
    etcd: &str,
    tls: Option<syncblock_replicator::cluster::EtcdTls>,
    command: VolumeCommand,
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the runtime")?;
    rt.block_on(async {
        let cluster = Cluster::connect(etcd, tls).await?;
        match command {
            VolumeCommand::Create { name, size, size_flag, replicas } => {
                let size = size.or(size_flag).context("give the volume's size")?;
                let spec = cluster.create_volume(&name, size, usize::from(replicas)).await?;
                let snap = cluster.snapshot().await?;
                let view = snap.volume_views().into_iter().find(|v| v.name == spec.name);
                println!("{}", serde_json::to_string_pretty(&view)?);
            }
            VolumeCommand::List { json } => {
                let views = cluster.snapshot().await?.volume_views();
                if json {
                    println!("{}", serde_json::to_string_pretty(&views)?);
                    return Ok(());
                }
                println!(
                    "{:<20} {:>10} {:<12} {:<12} {:<9} {:>6}  NBD",
                    "NAME", "SIZE", "PRIMARY", "SECONDARY", "STATE", "EPOCH"
                );
                for v in views {
                    println!(
                        "{:<20} {:>10} {:<12} {:<12} {:<9} {:>6}  {}",
                        v.name,
                        format_size(v.size),
                        v.primary,
                        v.secondary.as_deref().unwrap_or("-"),
                        v.state,
                        v.epoch,
                        v.nbd
                    );
                }
            }
            VolumeCommand::Switchover { name, admin_tls } => {
                let snap = cluster.snapshot().await?;
                let Some(v) = snap.volume_views().into_iter().find(|v| v.name == name) else {
                    bail!("no volume named {name:?}");
                };
                let m = plan::switchover(&snap, &v)
                    .map_err(|why| anyhow::anyhow!("{name} cannot switch over from {}: {why}", v.primary))?;
                run_moves(&snap, &[m], &admin_tls)?;
            }
            VolumeCommand::Delete { name } => {
                cluster.delete_volume(&name).await?;
                println!("deleted {name}");
            }
            VolumeCommand::Resize { name, size } => {
                let spec = cluster.resize_volume(&name, size).await?;
                println!(
                    "{name} is {} now; its replicas restart at that size (clients reconnect to see it)",
                    format_size(spec.size)
                );
            }
        }
        Ok(())
    })
}
