//! `syncblock pair`: a replicated pair and its witness in one process, on loopback.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{bail, Context, Result};
use syncblock_engine::{Epoch, Store};
use syncblock_nbd::config::{ReplNodeOptions, ReplRole, ReplVolume, ServeOptions, VolumeSpec, DEFAULT_REPL_TIMEOUT_MS};

use crate::{bind, engine_config, open_or_create, repl_config, serve, DEFAULT_VOLUME};

/// The primary's node name in `syncblock pair`: what its witness records as the primary.
const PAIR_PRIMARY_NODE: &str = "primary";

pub fn run(
    rt: &tokio::runtime::Runtime,
    size: u64,
    listen: SocketAddr,
    data_dir: &Path,
    admin: SocketAddr,
) -> Result<()> {
    let a_path = data_dir.join("pair-primary.img");
    let b_path = data_dir.join("pair-secondary.img");
    let mut opts = ServeOptions {
        store: Some(a_path.clone()),
        store_bytes: Some(size),
        listen: Some(listen),
        volumes: vec![VolumeSpec { name: DEFAULT_VOLUME.into(), size_bytes: size }],
        ..ServeOptions::default()
    };
    opts.replication =
        ReplNodeOptions { node: Some(PAIR_PRIMARY_NODE.into()), admin: Some(admin), ..Default::default() };
    // The ports first: one in use fails the start before any store is created.
    let bound = rt.block_on(bind(&opts.clone().resolve()))?;
    // `pair` is a demonstration: it creates its stores in its data directory when missing.
    let (a, new_a) = open_or_create(&a_path, Some((size, false)), engine_config(rt))?;
    let (b, new_b) = match open_or_create(&b_path, Some((size, false)), engine_config(rt)) {
        Ok(x) => x,
        Err(e) => {
            let _ = a.close();
            return Err(e);
        }
    };
    let res = (|| {
        if let Some(mut n) = new_a {
            n.commit()?;
        }
        if let Some(mut n) = new_b {
            n.commit()?;
        }
        rt.block_on(pair(a.clone(), b.clone(), opts, size, data_dir, bound))
    })();
    // Before the runtime goes: the engines run on it.
    let closed_a = a.close().context("closing the primary store");
    let closed_b = b.close().context("closing the secondary store");
    res.and(closed_a).and(closed_b)
}

async fn pair(
    a: Store,
    b: Store,
    mut opts: ServeOptions,
    size: u64,
    data_dir: &Path,
    bound: crate::Bound,
) -> Result<()> {
    tokio::spawn(crate::heap::trim_heap());
    let timeout = std::time::Duration::from_millis(DEFAULT_REPL_TIMEOUT_MS);
    let state_path = data_dir.join("witness.state");
    reseed_pair_witness(&a, &state_path).await?;
    let wl = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("binding the witness port")?;
    let witness = wl.local_addr()?;
    let witness_task = tokio::spawn(syncblock_replicator::witness::run(
        syncblock_replicator::net::tcp_listener(wl),
        state_path,
        syncblock_replicator::witness::DEFAULT_LEASE,
        syncblock_replicator::witness::Allow::default(),
    ));
    println!("witness (in-process) on {witness}  (grants the primary its epoch; nothing to connect to)");
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
        repl: repl_config("secondary", syncblock_replicator::net::tcp(), Some(witness), timeout, None),
    };
    let sec = syncblock_replicator::Node::start(b, ncfg, syncblock_replicator::Role::Secondary)
        .await
        .context("starting the secondary")?;
    let Some(sec_addr) = sec.repl_addr() else {
        sec.stop().await;
        witness_task.abort();
        bail!("the secondary store records this node as primary; likely cause: it was promoted; serve it with `syncblock serve --store {}`", data_dir.join("pair-secondary.img").display());
    };
    println!("secondary (in-process) accepting replication on {sec_addr}  (the primary's mirror link)");
    opts.replicate = vec![ReplVolume {
        volume: Some(DEFAULT_VOLUME.into()),
        role: ReplRole::Primary,
        peer: Some(sec_addr),
        peer_node: None,
        listen: None,
        policy: None,
        auto_failover: false,
    }];
    opts.replication.witness = Some(witness);
    let res = serve(a, opts.resolve(), bound, None).await;
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
    if st.epoch == Epoch(0) || st.role != syncblock_replicator::Role::Primary {
        return Ok(());
    }
    use syncblock_replicator::witness::{Record, WitnessState};
    let record = Record {
        volume: DEFAULT_VOLUME.into(),
        epoch: st.epoch,
        primary: PAIR_PRIMARY_NODE.into(),
        solo: false,
        synced: true,
    };
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
