//! A primary and a secondary on loopback, each on its own store file: the ack rule, the secondary
//! being an identical copy, strict mode waiting through an outage, incremental resync (and how many
//! bytes it ships), a secondary that lost its unflushed tail, and refusals at the handshake.

mod common;

use syncblock_replicator::wire::Frame;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use syncblock_engine::{Config, Epoch, Store, BLOCK_BYTES_U64};
use syncblock_replicator::{Primary, ReplConfig};

const VOL_BYTES: u64 = 64 << 20;

const PAIR_TIMEOUT: Duration = Duration::from_millis(1000);

fn pair_cfg(node: &str) -> ReplConfig {
    cfg(node, PAIR_TIMEOUT)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secondary_mirrors_writes_resyncs_incrementally_after_an_outage() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_stores(dir.path(), 256 << 20, VOL_BYTES).await;
    let (prim, sec) = start_pair(&a, &b, PAIR_TIMEOUT).await;
    let addr = sec.local_addr();
    wait_in_sync(&prim).await;

    // 1. Concurrent writes, trims and zeroes; every completed one is on both nodes.
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let p = prim.clone();
        tasks.push(tokio::spawn(async move {
            for k in 0..100u64 {
                let lba = (t * 7919 + k * 104_729) % (VOL_BYTES / BLOCK_BYTES_U64);
                match k % 10 {
                    7 => p.trim(lba * BLOCK_BYTES_U64, 4 * BLOCK_BYTES_U64).await.unwrap(),
                    8 => p.write_zeroes(lba * BLOCK_BYTES_U64, 2 * BLOCK_BYTES_U64, false, false).await.unwrap(),
                    9 => p.write(lba * BLOCK_BYTES_U64 + 512, Bytes::from(vec![t as u8; 1024]), true).await.unwrap(),
                    _ => p.write(lba * BLOCK_BYTES_U64, block(t * 1000 + k), false).await.unwrap(),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    prim.flush().await.unwrap();
    let st = prim.status().await;
    assert_eq!(st.lag_tags(), 0, "flush completed, so the peer has everything: {st:?}");
    assert_eq!(st.lag_bytes, 0, "{st:?}");
    assert!(st.rpo_zero());
    assert_eq!(image(&a).await, image(&b).await, "secondary differs from primary");
    let tag_before = b.volume("v").await.unwrap().last_tag;
    assert_eq!(tag_before, st.last_tag);

    // 2. The secondary goes away: strict mode, writes wait for it.
    sec.stop().await;
    let distinct = 300u64;
    let writer = {
        let p = prim.clone();
        tokio::spawn(async move {
            for k in 0..distinct {
                // Each block written twice while the peer is away: shipped once.
                p.write(k * 2 * BLOCK_BYTES_U64, block(50_000 + k), false).await.unwrap();
            }
            for k in 0..distinct {
                p.write(k * 2 * BLOCK_BYTES_U64, block(60_000 + k), false).await.unwrap();
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!writer.is_finished(), "a write completed while its peer was away (strict mode)");
    let st = prim.status().await;
    assert!(!st.rpo_zero());
    // The waiting write is the lag: one tag, one block.
    assert_eq!((st.lag_tags(), st.lag_bytes), (1, BLOCK_BYTES_U64), "{st:?}");

    // 3. The secondary returns (a fresh process on the same store, reopened after a clean close);
    // it receives only what it missed.
    let b_path = dir.path().join("b.img");
    let b = tokio::task::spawn_blocking(move || {
        b.close().unwrap();
        Store::open(&b_path, Config::default()).unwrap()
    })
    .await
    .unwrap();
    let sec = start_secondary(&b, addr, PAIR_TIMEOUT).await;
    tokio::time::timeout(Duration::from_secs(30), writer).await.expect("writes resume after resync").unwrap();
    prim.flush().await.unwrap();
    wait_in_sync(&prim).await;
    let view = prim.status().await.peer;
    // The first write after the outage started waiting; the others queued behind it: so the resync
    // shipped one version of at most `distinct` blocks, and later writes were streamed.
    assert!(
        view.resync_bytes_shipped <= distinct * BLOCK_BYTES_U64 * 11 / 10,
        "resync shipped {} bytes for {} distinct blocks",
        view.resync_bytes_shipped,
        distinct
    );
    assert!(!view.resync_full, "an incremental resync");
    assert_eq!(view.resync.bytes_done, view.resync.bytes_total);
    assert_eq!(image(&a).await, image(&b).await, "secondary differs after resync");
    assert!(sec.status().consistent);
    prim.stop();
    sec.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_another_volume_size_is_refused_and_untouched() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = tokio::task::spawn_blocking({
        let d = dir.path().to_path_buf();
        move || (store(&d, "a.img", 256 << 20, VOL_BYTES), store(&d, "b.img", 256 << 20, VOL_BYTES / 2))
    })
    .await
    .unwrap();
    let vb = b.volume("v").await.unwrap();
    b.write(vb.id, 0, block(1), false).await.unwrap();
    let sec = start_secondary(&b, "127.0.0.1:0".parse().unwrap(), PAIR_TIMEOUT).await;
    let prim = Primary::start(a.clone(), "v", sec.local_addr(), pair_cfg("a"), None).await.unwrap();
    let mut w = prim.peer_view();
    let v = tokio::time::timeout(Duration::from_secs(10), w.wait_for(|v| v.last_error.is_some()))
        .await
        .unwrap()
        .unwrap()
        .clone();
    let err = v.last_error.unwrap();
    assert!(err.contains("resize one side"), "{err}");
    assert!(!v.connected);
    assert_eq!(&b.read(vb.id, 0, BLOCK_BYTES_U64).await.unwrap()[..], &block(1)[..], "the refused peer's data changed");
    prim.stop();
    sec.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_on_the_replication_port_leave_the_live_session_alone() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_stores(dir.path(), 256 << 20, VOL_BYTES).await;
    let sec = start_secondary(&b, "127.0.0.1:0".parse().unwrap(), PAIR_TIMEOUT).await;
    let prim = Primary::start(a.clone(), "v", sec.local_addr(), pair_cfg("a"), None).await.unwrap();
    wait_in_sync(&prim).await;
    prim.write(0, block(1), true).await.unwrap();
    let resyncs = prim.peer_view().borrow().resyncs;
    let hello = |pair: u64, epoch: Epoch| Frame::Hello {
        pair,
        epoch,
        last_tag: 0,
        size_bytes: VOL_BYTES,
        volume: "v".into(),
        node: "intruder".into(),
        history: vec![],
    };
    // Garbage, an HTTP request, a connection closed at once, one that stays silent, a hello of
    // another pair, and a hello of this pair from an older epoch: each is refused or dropped.
    let probes: Vec<Vec<u8>> = vec![
        b"\x00\x01garbage garbage garbage".to_vec(),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        vec![],
        hello(prim.pair() ^ 1, Epoch(prim.epoch().0 + 5)).encode().to_vec(),
        hello(prim.pair(), Epoch(0)).encode().to_vec(),
    ];
    let silent = tokio::net::TcpStream::connect(sec.local_addr()).await.unwrap();
    let mut answers = Vec::new();
    for p in &probes {
        let mut s = tokio::net::TcpStream::connect(sec.local_addr()).await.unwrap();
        s.write_all(p).await.unwrap();
        if p.is_empty() {
            continue;
        }
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        answers.push(syncblock_replicator::wire::decode_frame(&buf).ok());
        // The live session carries on: writes are confirmed by the peer between probes.
        tokio::time::timeout(Duration::from_secs(2), prim.write(BLOCK_BYTES_U64, block(2), true))
            .await
            .expect("a write during the probes waited")
            .unwrap();
    }
    use syncblock_replicator::wire::Refusal;
    let refusals: Vec<Option<Refusal>> = answers
        .iter()
        .map(|a| a.as_ref().and_then(|f| if let Frame::Refuse { why, .. } = f { Some(*why) } else { None }))
        .collect();
    assert_eq!(refusals, [None, None, Some(Refusal::WrongPair), Some(Refusal::Deposed { epoch: prim.epoch() })]);
    drop(silent);
    let v = prim.peer_view().borrow().clone();
    assert!(v.connected && v.in_sync, "{v:?}");
    assert_eq!(v.resyncs, resyncs, "a probe replaced the live session");
    assert!(sec.status().connected && sec.status().last_error.is_none(), "{:?}", sec.status());
    let vb = b.volume("v").await.unwrap();
    assert_eq!(&b.read(vb.id, BLOCK_BYTES_U64, BLOCK_BYTES_U64).await.unwrap()[..], &block(2)[..]);
    prim.stop();
    sec.stop().await;
}

/// A client that writes one block and flushes, over and over (a database's commit loop), costs
/// one round trip per commit: once the pattern is seen, each write reaches the peer as FUA, the
/// peer's ack already says it is durable, and the flush completes without waiting. Both engines
/// make those writes durable by themselves (FUA log writes), not by fdatasync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_loop_writes_are_durable_on_the_peer_when_acknowledged() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_stores(dir.path(), 256 << 20, VOL_BYTES).await;
    let (prim, sec) = start_pair(&a, &b, PAIR_TIMEOUT).await;
    wait_in_sync(&prim).await;
    let (a0, b0) = (a.stats().await.unwrap(), b.stats().await.unwrap());

    const COMMITS: u64 = 50;
    let mut durable_at_ack = 0;
    for k in 0..COMMITS {
        let tag = prim.write_tagged(k * BLOCK_BYTES_U64, block(70_000 + k), false).await.unwrap();
        if prim.status().await.peer.durable >= tag {
            durable_at_ack += 1;
        }
        prim.flush().await.unwrap();
    }
    let (a1, b1) = (a.stats().await.unwrap(), b.stats().await.unwrap());
    // The first few commits teach both sides the pattern; every later one goes the short way.
    assert!(
        durable_at_ack >= COMMITS - 5,
        "only {durable_at_ack} of {COMMITS} writes were durable on the peer when acknowledged"
    );
    for (name, before, after) in [("primary", &a0, &a1), ("secondary", &b0, &b1)] {
        let (syncs, fua) = (after.syncs - before.syncs, after.durable_writes - before.durable_writes);
        assert!(
            fua >= COMMITS - 5 && syncs <= 5,
            "{name}: {fua} FUA log writes and {syncs} fdatasyncs for {COMMITS} commits"
        );
    }
    assert_eq!(image(&a).await, image(&b).await, "secondary differs from primary");
    prim.stop();
    sec.stop().await;
}
