//! Failover with a witness, in one process on loopback: the primary dies, the secondary takes over
//! automatically once the witness agrees, keeps every acknowledged write, serves alone (degrade
//! policy), and the old primary, restarted, learns it was deposed, steps down, has its unreplicated
//! write rolled back and is resynced to the new primary's history.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use syncblock_engine::{Epoch, Tag, BLOCK_BYTES_U64};
use syncblock_replicator::{Node, NodeConfig, Policy, ReplConfig, Role};
use tokio::net::TcpListener;

const VOL_BYTES: u64 = 32 << 20;

fn node_cfg(node: &str, listen: SocketAddr, peer: SocketAddr, witness: SocketAddr) -> NodeConfig {
    NodeConfig {
        volume: "v".into(),
        repl_listen: listen,
        peer,
        auto_failover: true,
        repl: ReplConfig {
            node: node.into(),
            heartbeat: Duration::from_millis(100),
            timeout: Duration::from_millis(800),
            reconnect: Duration::from_millis(50),
            authority: Some(syncblock_replicator::authority::Witness::shared(
                syncblock_replicator::net::tcp(),
                witness,
            )),
            policy: Policy::Degrade,
            ..ReplConfig::default()
        },
    }
}

/// A witness (deciding with an 800 ms timeout) and a pair on loopback: `a` primary, `b` secondary.
async fn start_pair(
    dir: &std::path::Path,
    a: &syncblock_engine::Store,
    b: &syncblock_engine::Store,
) -> (tokio::task::JoinHandle<syncblock_replicator::Result<()>>, SocketAddr, SocketAddr, SocketAddr, Node, Node) {
    let (witness_task, witness) = start_witness(dir).await;
    let (a_repl, b_repl, node_a, node_b) = start_nodes(a, b, witness).await;
    (witness_task, witness, a_repl, b_repl, node_a, node_b)
}

/// A witness on loopback deciding with an 800 ms timeout, its state file in `dir`.
async fn start_witness(
    dir: &std::path::Path,
) -> (tokio::task::JoinHandle<syncblock_replicator::Result<()>>, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let witness = listener.local_addr().unwrap();
    let task = tokio::spawn(syncblock_replicator::witness::run(
        syncblock_replicator::net::tcp_listener(listener),
        dir.join("witness.state"),
        Duration::from_millis(800),
        syncblock_replicator::witness::Allow::default(),
    ));
    (task, witness)
}

/// Waits until `p`'s peer is in sync, then writes blocks 0..64 (block `k` holds `block(k)`) and
/// flushes them.
async fn write_64_in_sync(p: &syncblock_replicator::Primary) {
    let mut v = p.peer_view();
    tokio::time::timeout(Duration::from_secs(10), v.wait_for(|v| v.in_sync)).await.unwrap().unwrap();
    for k in 0..64u64 {
        p.write(k * BLOCK_BYTES_U64, block(k), false).await.unwrap();
    }
    p.flush().await.unwrap();
}

/// `node_cfg` for a node that knows its peer's name (which a switchover needs).
fn named_cfg(node: &str, peer: &str, listen: SocketAddr, to: SocketAddr, witness: SocketAddr) -> NodeConfig {
    let mut cfg = node_cfg(node, listen, to, witness);
    cfg.repl.peer_node = Some(peer.into());
    cfg
}

/// Nodes `a` (primary) and `b` (secondary) of a pair on loopback, with `witness`.
async fn start_nodes(
    a: &syncblock_engine::Store,
    b: &syncblock_engine::Store,
    witness: SocketAddr,
) -> (SocketAddr, SocketAddr, Node, Node) {
    let (a_repl, b_repl) = (free_addr().await, free_addr().await);
    let node_b = Node::start(b.clone(), node_cfg("b", b_repl, a_repl, witness), Role::Secondary).await.unwrap();
    let node_a = Node::start(a.clone(), node_cfg("a", a_repl, b_repl, witness), Role::Primary).await.unwrap();
    (a_repl, b_repl, node_a, node_b)
}

/// Two pairs whose volumes are both named `v` and whose nodes are both named `a` and `b` share
/// one witness: its records are keyed by pair id, so the death of one pair's primary fails over
/// that pair only, and the other pair's primary is neither deposed nor refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pairs_with_the_same_volume_name_share_a_witness_safely() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (a1, b1) = two_stores(dir.path(), 128 << 20, VOL_BYTES).await;
    let sub = dir.path().join("two");
    std::fs::create_dir_all(&sub).unwrap();
    let (a2, b2) = two_stores(&sub, 128 << 20, VOL_BYTES).await;
    let (witness_task, witness, _, _, node_a1, node_b1) = start_pair(dir.path(), &a1, &b1).await;
    let (_, _, node_a2, node_b2) = start_nodes(&a2, &b2, witness).await;
    let (p1, p2) = (node_a1.primary().unwrap(), node_a2.primary().unwrap());
    assert_ne!(p1.pair(), p2.pair(), "two pairs drew one id");
    for p in [&p1, &p2] {
        let mut v = p.peer_view();
        tokio::time::timeout(Duration::from_secs(10), v.wait_for(|v| v.in_sync)).await.unwrap().unwrap();
        p.write(0, block(p.pair()), true).await.unwrap();
    }

    // Pair 1's primary dies: its secondary takes over; pair 2 carries on untouched.
    node_a1.stop().await;
    let mut roles = node_b1.role_changes();
    tokio::time::timeout(Duration::from_secs(10), roles.wait_for(|_| node_b1.is_primary()))
        .await
        .expect("pair 1 fails over")
        .unwrap();
    assert_eq!(node_b1.primary().unwrap().epoch(), Epoch(2));
    // Well past the takeover window, pair 2's primary still reports and writes with its peer.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(node_a2.is_primary() && !node_b2.is_primary());
    assert_eq!(p2.epoch(), Epoch(1));
    let st = p2.status().await;
    assert!(st.rpo_zero(), "pair 2 lost its peer: {st:?}");
    tokio::time::timeout(Duration::from_secs(5), p2.write(BLOCK_BYTES_U64, block(7), true))
        .await
        .expect("pair 2 writes")
        .unwrap();
    let state = syncblock_replicator::witness::load(&dir.path().join("witness.state")).unwrap();
    let epochs: Vec<(Epoch, &str)> = {
        let mut e: Vec<(Epoch, &str)> = state.pairs.values().map(|r| (r.epoch, r.primary.as_str())).collect();
        e.sort();
        e
    };
    assert_eq!(epochs, [(Epoch(1), "a"), (Epoch(2), "b")], "{state:?}");

    for n in [node_a2, node_b2, node_b1] {
        n.stop().await;
    }
    witness_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_secondary_takes_over_and_the_old_primary_is_rolled_back_when_it_returns() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_stores(dir.path(), 128 << 20, VOL_BYTES).await;
    let (witness_task, witness, a_repl, b_repl, node_a, node_b) = start_pair(dir.path(), &a, &b).await;
    let pa = node_a.primary().expect("a is primary");
    let mut v = pa.peer_view();
    tokio::time::timeout(Duration::from_secs(10), v.wait_for(|v| v.in_sync)).await.unwrap().unwrap();

    // Acknowledged writes, some flushed.
    for k in 0..64u64 {
        pa.write(k * BLOCK_BYTES_U64, block(k), k % 8 == 0).await.unwrap();
    }
    pa.flush().await.unwrap();
    let expected = image(&a).await;

    // The primary dies (no more reports, no more link). The secondary takes over.
    let died = Instant::now();
    node_a.stop().await;
    let mut roles = node_b.role_changes();
    tokio::time::timeout(Duration::from_secs(10), roles.wait_for(|_| node_b.is_primary()))
        .await
        .expect("automatic failover within 10 s")
        .unwrap();
    let failover = died.elapsed();
    assert!(failover < Duration::from_secs(5), "failover took {failover:?}");
    assert_eq!(image(&b).await, expected, "the new primary lacks acknowledged writes");

    // It serves alone once the witness consents (degrade policy).
    let pb = node_b.primary().unwrap();
    assert_eq!(pb.epoch(), Epoch(2));
    tokio::time::timeout(Duration::from_secs(10), pb.write(100 * BLOCK_BYTES_U64, block(1000), true))
        .await
        .expect("the new primary serves writes alone")
        .unwrap();
    for k in 0..8u64 {
        pb.write(k * BLOCK_BYTES_U64, block(2000 + k), false).await.unwrap();
    }
    pb.flush().await.unwrap();

    // The old primary holds a write that was never replicated (it took it as it died).
    let va = a.volume("v").await.unwrap();
    let divergent_tag = va.last_tag + 1;
    a.enqueue_write(va.id, 200 * BLOCK_BYTES_U64, block(3000), true, Tag::seq(divergent_tag))
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();

    // It comes back believing it is primary: the witness tells it otherwise; it steps down, and
    // the new primary rolls it back and resyncs it.
    let node_a = Node::start(a.clone(), node_cfg("a", a_repl, b_repl, witness), Role::Primary).await.unwrap();
    let mut roles = node_a.role_changes();
    tokio::time::timeout(Duration::from_secs(10), roles.wait_for(|_| !node_a.is_primary()))
        .await
        .expect("the deposed primary steps down")
        .unwrap();
    let mut v = pb.peer_view();
    tokio::time::timeout(Duration::from_secs(15), v.wait_for(|v| v.in_sync)).await.expect("resync").unwrap();
    pb.flush().await.unwrap();
    let got = image(&a).await;
    assert!(
        got[200 * BLOCK_BYTES_U64 as usize..201 * BLOCK_BYTES_U64 as usize].iter().all(|b| *b == 0),
        "the divergent write survived"
    );
    assert_eq!(got, image(&b).await, "the old primary differs from the new one after resync");
    let st = pb.status().await;
    assert!(st.rpo_zero(), "{st:?}");

    node_a.stop().await;
    node_b.stop().await;
    witness_task.abort();
}

/// Under the degrade policy the primary keeps writing while its peer is away; when the peer
/// returns, the resync ships each block changed meanwhile once, however often it was rewritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_outage_the_resync_ships_only_the_distinct_data_written_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_stores(dir.path(), 128 << 20, VOL_BYTES).await;
    let (witness_task, witness, a_repl, b_repl, node_a, node_b) = start_pair(dir.path(), &a, &b).await;
    let pa = node_a.primary().unwrap();
    write_64_in_sync(&pa).await;

    // The secondary goes away; the primary carries on alone once the witness consents.
    node_b.stop().await;
    let distinct = 500u64;
    for round in 0..3u64 {
        for k in 0..distinct {
            let w = pa.write((1000 + k) * BLOCK_BYTES_U64, block(round * 10_000 + k), false);
            tokio::time::timeout(Duration::from_secs(10), w).await.expect("solo write").unwrap();
        }
    }
    pa.flush().await.unwrap();
    assert!(pa.status().await.peer.solo);

    let node_b = Node::start(b.clone(), node_cfg("b", b_repl, a_repl, witness), Role::Secondary).await.unwrap();
    let mut v = pa.peer_view();
    tokio::time::timeout(Duration::from_secs(20), v.wait_for(|v| v.in_sync && v.connected)).await.unwrap().unwrap();
    let shipped = pa.status().await.peer.resync_bytes_shipped;
    let ratio = shipped as f64 / (distinct * BLOCK_BYTES_U64) as f64;
    println!("resync shipped {shipped} bytes for {} distinct bytes: {ratio:.3}", distinct * BLOCK_BYTES_U64);
    assert!(ratio <= 1.1, "resync shipped {shipped} bytes for {} distinct bytes written", distinct * BLOCK_BYTES_U64);
    pa.flush().await.unwrap();
    assert_eq!(image(&a).await, image(&b).await);
    node_a.stop().await;
    node_b.stop().await;
    witness_task.abort();
}

/// A planned switchover: while a client keeps writing, the primary hands its role to its in-sync
/// peer. Every write it acknowledged is on the new primary, which takes the role in a newer epoch,
/// serves, and resyncs the old primary (now its secondary) to an identical image. A switchover is
/// refused on a node that is not primary, and while the peer is away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_hands_the_role_to_the_in_sync_peer_and_loses_no_acknowledged_write() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_stores(dir.path(), 128 << 20, VOL_BYTES).await;
    let (witness_task, witness) = start_witness(dir.path()).await;
    let (a_repl, b_repl) = (free_addr().await, free_addr().await);
    let node_b = Node::start(b.clone(), named_cfg("b", "a", b_repl, a_repl, witness), Role::Secondary).await.unwrap();
    let node_a = Node::start(a.clone(), named_cfg("a", "b", a_repl, b_repl, witness), Role::Primary).await.unwrap();
    let pa = node_a.primary().unwrap();
    let err = node_b.switchover().await.expect_err("the secondary cannot switch over");
    assert!(err.to_string().contains("not the primary"), "{err}");
    let mut v = pa.peer_view();
    tokio::time::timeout(Duration::from_secs(10), v.wait_for(|v| v.in_sync)).await.unwrap().unwrap();

    // A client writes block after block, each acknowledged or refused, until the role moves.
    let writer = {
        let pa = pa.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            for k in 0..4096u64 {
                match pa.write((k % 512) * BLOCK_BYTES_U64, block(k), k % 16 == 0).await {
                    Ok(()) => acked.push(k),
                    Err(_) => break,
                }
            }
            acked
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let grant = node_a.switchover().await.expect("switchover");
    assert_eq!((grant.primary.as_str(), grant.epoch, grant.solo), ("b", Epoch(2), false));
    assert!(!node_a.is_primary(), "the old primary stepped down");
    let acked = writer.await.unwrap();
    assert!(acked.len() < 4096, "the client's writes went on after the switchover");
    let mut roles = node_b.role_changes();
    tokio::time::timeout(Duration::from_secs(5), roles.wait_for(|_| node_b.is_primary()))
        .await
        .expect("the peer takes the role")
        .unwrap();
    let pb = node_b.primary().unwrap();
    assert!(pb.epoch() > Epoch(2), "the new primary is in a newer epoch than the grant's");

    // Every acknowledged write is on the new primary (the last write of each block wins).
    let got = image(&b).await;
    let mut last = std::collections::BTreeMap::new();
    for k in &acked {
        last.insert(k % 512, *k);
    }
    for (lba, k) in &last {
        let at = (*lba * BLOCK_BYTES_U64) as usize;
        assert_eq!(&got[at..at + BLOCK_BYTES_U64 as usize], &block(*k)[..], "block {lba} (write {k}) lost");
    }

    // The new primary serves, and resyncs the old one to the same image.
    let mut v = pb.peer_view();
    tokio::time::timeout(Duration::from_secs(10), v.wait_for(|v| v.in_sync)).await.expect("resync").unwrap();
    pb.write(600 * BLOCK_BYTES_U64, block(9999), true).await.unwrap();
    pb.flush().await.unwrap();
    assert_eq!(image(&a).await, image(&b).await, "the replicas differ after the switchover");
    assert!(pb.status().await.rpo_zero());

    // Without an answer from the witness, the switchover is refused and writes carry on here.
    witness_task.abort();
    let _ = witness_task.await;
    let err = node_b.switchover().await.expect_err("no switchover without the witness");
    assert!(node_b.is_primary(), "stepped down without a grant: {err}");
    tokio::time::timeout(Duration::from_secs(5), pb.write(601 * BLOCK_BYTES_U64, block(9998), true))
        .await
        .expect("writes are taken again after a refused switchover")
        .unwrap();

    // With the peer away, a switchover is refused and writes carry on.
    node_a.stop().await;
    tokio::time::timeout(Duration::from_secs(5), v.wait_for(|v| !v.connected)).await.unwrap().unwrap();
    let err = node_b.switchover().await.expect_err("no switchover to an absent peer");
    assert!(err.to_string().contains("not in sync"), "{err}");
    assert!(node_b.is_primary());

    node_b.stop().await;
}

/// A switchover whose new primary dies before it takes the role: the old primary stepped down
/// having seen the grant's epoch, holds every acknowledged write (none can be acknowledged in the
/// new epoch without it, the grant leaving the pair not solo), and takes the role back once the
/// witness has not heard from the new primary for its takeover window. Before, it asked as a node
/// of the older epoch and was refused (`Behind`) for as long as the new primary stayed away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_new_primary_dies_before_taking_the_role_the_old_one_takes_it_back() {
    let p = StallPair::start(|witness| witness).await;
    let grant = p.node_a.switchover().await.expect("switchover");
    assert_eq!((grant.primary.as_str(), grant.epoch), ("b", Epoch(2)));
    assert!(!p.node_a.is_primary(), "the old primary stepped down");
    p.new_primary_dies_and_old_takes_the_role_back().await;
}

/// A witness and a pair for the switchover-stall tests: `a` primary, asking its authority as
/// `authority` wraps the witness; `b` secondary, reaching no witness, so that granted the role it
/// cannot take it (as if it died at once); the 64 blocks of [`write_64_in_sync`] written.
struct StallPair {
    _dir: tempfile::TempDir,
    a: syncblock_engine::Store,
    witness_task: tokio::task::JoinHandle<syncblock_replicator::Result<()>>,
    node_a: Node,
    node_b: Node,
}

impl StallPair {
    async fn start(
        authority: impl FnOnce(
            syncblock_replicator::authority::SharedAuthority,
        ) -> syncblock_replicator::authority::SharedAuthority,
    ) -> StallPair {
        init_tracing();
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = two_stores(dir.path(), 128 << 20, VOL_BYTES).await;
        let (witness_task, witness) = start_witness(dir.path()).await;
        let nowhere = free_addr().await;
        let (a_repl, b_repl) = (free_addr().await, free_addr().await);
        let mut cfg_a = named_cfg("a", "b", a_repl, b_repl, witness);
        cfg_a.repl.authority = cfg_a.repl.authority.map(authority);
        let node_b =
            Node::start(b.clone(), named_cfg("b", "a", b_repl, a_repl, nowhere), Role::Secondary).await.unwrap();
        let node_a = Node::start(a.clone(), cfg_a, Role::Primary).await.unwrap();
        write_64_in_sync(&node_a.primary().unwrap()).await;
        StallPair { _dir: dir, a, witness_task, node_a, node_b }
    }

    /// `b` stops, and `a`, stepped down, takes the role back (see [`takes_the_role_back`]).
    async fn new_primary_dies_and_old_takes_the_role_back(self) {
        self.node_b.stop().await;
        takes_the_role_back(&self.node_a, &self.a).await;
        self.node_a.stop().await;
        self.witness_task.abort();
    }
}

/// `node` (the old primary of a switchover) becomes primary again within 10 s, in epoch 3, holding
/// the 64 blocks of [`write_64_in_sync`], and serves writes (alone, with the witness's consent:
/// the degrade policy).
async fn takes_the_role_back(node: &Node, store: &syncblock_engine::Store) {
    let mut roles = node.role_changes();
    tokio::time::timeout(Duration::from_secs(10), roles.wait_for(|_| node.is_primary()))
        .await
        .expect("the old primary takes the role back")
        .unwrap();
    let p = node.primary().unwrap();
    assert_eq!(p.epoch(), Epoch(3), "a newer epoch than the switchover's");
    let got = image(store).await;
    for k in 0..64u64 {
        let at = (k * BLOCK_BYTES_U64) as usize;
        assert_eq!(&got[at..at + BLOCK_BYTES_U64 as usize], &block(k)[..], "block {k} lost");
    }
    tokio::time::timeout(Duration::from_secs(5), p.write(100 * BLOCK_BYTES_U64, block(100), true))
        .await
        .expect("writes are served")
        .unwrap();
}

/// An authority whose answers to a switchover are lost: the witness decides it, the asker hears
/// nothing.
struct LosesHandoverAnswers(syncblock_replicator::authority::SharedAuthority);

impl syncblock_replicator::authority::Authority for LosesHandoverAnswers {
    fn ask<'a>(
        &'a self,
        req: &'a syncblock_replicator::wire::Frame,
        timeout: Duration,
    ) -> syncblock_replicator::authority::BoxFuture<
        'a,
        syncblock_replicator::Result<syncblock_replicator::witness::Grant>,
    > {
        Box::pin(async move {
            let r = self.0.ask(req, timeout).await;
            if matches!(req, syncblock_replicator::wire::Frame::WitnessHandover { .. }) {
                return Err(syncblock_replicator::ReplError::Stopped("test: the answer was lost".into()));
            }
            r
        })
    }

    fn describe(&self) -> String {
        "a witness that loses switchover answers".into()
    }
}

/// The same with the grant's answer lost: the old primary, writing on in its epoch, is deposed by
/// its next report, and takes the refusal's epoch (the one past its switchover's) for the grant it
/// did not hear, so it too may take the role back when the new primary dies before taking it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_a_switchover_answer_is_lost_and_the_new_primary_dies_the_old_one_takes_the_role_back() {
    let p = StallPair::start(|witness| std::sync::Arc::new(LosesHandoverAnswers(witness))).await;
    let err = p.node_a.switchover().await.expect_err("the answer is lost");
    assert!(err.to_string().contains("answer was lost"), "{err}");
    let mut roles = p.node_a.role_changes();
    tokio::time::timeout(Duration::from_secs(5), roles.wait_for(|_| !p.node_a.is_primary()))
        .await
        .expect("the next report deposes the old primary")
        .unwrap();
    p.new_primary_dies_and_old_takes_the_role_back().await;
}
