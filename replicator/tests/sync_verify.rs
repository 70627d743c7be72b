//! Full sync by checksums and online verify, on loopback: a peer that shares no history but
//! already holds the data receives only the blocks that differ; client writes racing with the
//! comparison never leave it stale; verify finds nothing on a healthy pair under load, reports the
//! exact ranges changed behind the primary's back, and repairs them; both report progress.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use common::*;
use syncblock_engine::{ByteRange, Store, BLOCK_BYTES, BLOCK_BYTES_U64};
use syncblock_replicator::{NodeStatus, Primary, Secondary};

const VOL_BYTES: u64 = 64 << 20;

async fn stores(dir: &Path) -> (Store, Store) {
    two_stores(dir, 512 << 20, VOL_BYTES).await
}

const SV_TIMEOUT: Duration = Duration::from_millis(2000);

/// The same unreplicated contents on a store: the first 60 MiB written, the last 4 MiB a hole.
async fn fill(s: &Store) -> u64 {
    let v = s.volume("v").await.unwrap();
    let mapped = 60u64 << 20;
    for k in 0..mapped >> 20 {
        s.write(v.id, k << 20, data(k, 1 << 20), false).await.unwrap();
    }
    s.flush().await.unwrap();
    mapped
}

async fn mapping(s: &Store) -> Vec<Option<u32>> {
    let v = s.volume("v").await.unwrap();
    let mut out = Vec::new();
    for at in (0..VOL_BYTES).step_by(16 << 20) {
        out.extend(s.block_crcs(v.id, at, 16 << 20).await.unwrap());
    }
    out
}

/// Both replicas hold the same bytes and the same holes.
async fn assert_identical(a: &Store, b: &Store) {
    assert!(image(a).await == image(b).await, "the replicas' data differ");
    assert!(mapping(a).await == mapping(b).await, "the replicas' mappings differ");
}

async fn start_pair(a: &Store, b: &Store) -> (Primary, Secondary) {
    common::start_pair(a, b, SV_TIMEOUT).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_sync_of_a_peer_that_already_holds_the_data_ships_almost_nothing() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = stores(dir.path()).await;
    let mapped = fill(&a).await;
    fill(&b).await;
    let t = Instant::now();
    let (prim, sec) = start_pair(&a, &b).await;
    wait_in_sync(&prim).await;
    let v = prim.status().await.peer;
    println!(
        "identical 64 MiB peer: full sync in {:?}, shipped {} of {} mapped bytes, skipped {}",
        t.elapsed(),
        v.resync_bytes_shipped,
        mapped,
        v.resync_bytes_skipped
    );
    assert!(v.resync_full, "no shared history: a full sync");
    assert!(v.resync_bytes_shipped * 20 < mapped, "shipped {} of {mapped} bytes", v.resync_bytes_shipped);
    assert_eq!(v.resync_bytes_skipped, VOL_BYTES, "every block (and hole) matched");
    assert_eq!((v.resync.bytes_done, v.resync.bytes_total), (VOL_BYTES, VOL_BYTES));
    assert!(!v.resync.active() && v.resync.eta_at(Instant::now()).is_none());
    assert_identical(&a, &b).await;
    prim.stop();
    sec.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_sync_ships_only_the_blocks_that_differ_and_trims_what_only_the_peer_has() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = stores(dir.path()).await;
    fill(&a).await;
    fill(&b).await;
    let (va, vb) = (a.volume("v").await.unwrap().id, b.volume("v").await.unwrap().id);
    // The peer's own changes: 5 blocks rewritten, 3 blocks trimmed (the primary has data there),
    // 2 blocks written in the primary's hole (the primary has none: trimmed on the peer).
    for lba in [3u64, 4, 5, 900, 12_000] {
        b.write(vb, lba * BLOCK_BYTES_U64, data(7_000 + lba, BLOCK_BYTES), false).await.unwrap();
    }
    b.trim(vb, 5_000 * BLOCK_BYTES_U64, 3 * BLOCK_BYTES_U64).await.unwrap();
    b.write(
        vb,
        (VOL_BYTES - 2 * BLOCK_BYTES_U64) / BLOCK_BYTES_U64 * BLOCK_BYTES_U64,
        data(99, 2 * BLOCK_BYTES),
        false,
    )
    .await
    .unwrap();
    // And the primary's: one sector of one block.
    a.write(va, 7_000 * BLOCK_BYTES_U64 + 512, data(5, 512), false).await.unwrap();
    let (prim, sec) = start_pair(&a, &b).await;
    wait_in_sync(&prim).await;
    let v = prim.status().await.peer;
    println!("a few differing blocks: shipped {} bytes, skipped {}", v.resync_bytes_shipped, v.resync_bytes_skipped);
    assert_eq!(v.resync_bytes_shipped, (5 + 3 + 1) * BLOCK_BYTES_U64, "exactly the differing blocks");
    assert_eq!(v.resync_bytes_skipped, VOL_BYTES - (5 + 3 + 1 + 2) * BLOCK_BYTES_U64);
    assert_identical(&a, &b).await;
    let report = prim.verify(false).await.unwrap();
    assert_eq!(report.blocks_differing, 0, "{report:?}");
    prim.stop();
    sec.stop().await;
}

/// A client workload on the primary until `stop`: up to 32 operations in flight at once (so
/// overlapping ones race in the sequencer too), whole-block and sub-block writes, trims and
/// zeroings all over the volume. Returns how many operations were issued while `during` held.
fn workload(
    p: &Primary,
    seed: u64,
    stop: Arc<AtomicU64>,
    during: impl Fn() -> bool + Send + Sync + 'static,
) -> tokio::task::JoinHandle<u64> {
    let p = p.clone();
    tokio::spawn(async move {
        let in_flight = Arc::new(tokio::sync::Semaphore::new(32));
        let mut ops = tokio::task::JoinSet::new();
        let mut x = seed | 1;
        let mut k = 0u64;
        let mut overlapped = 0;
        while stop.load(Ordering::Relaxed) == 0 {
            let permit = in_flight.clone().acquire_owned().await.unwrap();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let lba = x % (VOL_BYTES / BLOCK_BYTES_U64 - 4);
            if during() {
                overlapped += 1;
            }
            let (p, k2, x2) = (p.clone(), k, x);
            ops.spawn(async move {
                match k2 % 8 {
                    0 => p.trim(lba * BLOCK_BYTES_U64, 2 * BLOCK_BYTES_U64).await,
                    1 => p.write_zeroes(lba * BLOCK_BYTES_U64 + 1024, 1024, false, false).await,
                    2 | 3 => p.write(lba * BLOCK_BYTES_U64 + 512 * (k2 % 7), data(x2, 512), false).await,
                    _ => p.write(lba * BLOCK_BYTES_U64, data(x2, 2 * BLOCK_BYTES), false).await,
                }
                .unwrap();
                drop(permit);
            });
            k += 1;
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        while let Some(r) = ops.join_next().await {
            r.unwrap();
        }
        overlapped
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_writes_racing_with_a_full_sync_never_leave_the_peer_stale() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = stores(dir.path()).await;
    fill(&a).await;
    fill(&b).await;
    // The peer differs in every other block of the first half (shipping 16 MiB keeps the sync
    // busy while the clients write), and the primary in one block of every 64 by a sub-block write.
    let (va, vb) = (a.volume("v").await.unwrap().id, b.volume("v").await.unwrap().id);
    for lba in (0..VOL_BYTES / BLOCK_BYTES_U64 / 2).step_by(2) {
        b.write(vb, lba * BLOCK_BYTES_U64, data(lba, BLOCK_BYTES), false).await.unwrap();
    }
    for lba in (8..VOL_BYTES / BLOCK_BYTES_U64).step_by(64) {
        a.write(va, lba * BLOCK_BYTES_U64 + 2048, data(lba + 1, 1024), false).await.unwrap();
    }
    let (overlapped, v) = full_sync_racing_with_clients(&a, &b, 4, 1000, Duration::from_millis(200)).await;
    println!(
        "racing full sync: {overlapped} client operations issued during it; shipped {} bytes, skipped {}",
        v.resync_bytes_shipped, v.resync_bytes_skipped
    );
    assert!(overlapped > 0, "the workload did not overlap the sync");
    assert!(v.resync_bytes_skipped > VOL_BYTES / 2, "most blocks matched: {v:?}");
}

/// Starts the pair with `writers` clients (seeds from `seed`) writing while its resync runs, waits
/// until it is in sync and `linger` more, stops them, and checks that a verify pass finds no
/// difference and that the replicas are identical. Returns how many client operations overlapped
/// the resync, and the peer's view at the end.
async fn full_sync_racing_with_clients(
    a: &Store,
    b: &Store,
    writers: u64,
    seed: u64,
    linger: Duration,
) -> (u64, syncblock_replicator::PeerView) {
    let (prim, sec) = start_pair(a, b).await;
    let stop = Arc::new(AtomicU64::new(0));
    let mut running = Vec::new();
    for t in 0..writers {
        let view = prim.peer_view();
        running.push(workload(&prim, seed + t, stop.clone(), move || view.borrow().resync.active()));
    }
    wait_in_sync(&prim).await;
    tokio::time::sleep(linger).await;
    stop.store(1, Ordering::Relaxed);
    let mut overlapped = 0;
    for w in running {
        overlapped += w.await.unwrap();
    }
    prim.flush().await.unwrap();
    let v = prim.status().await.peer;
    let report = prim.verify(false).await.unwrap();
    assert_eq!(report.blocks_differing, 0, "{report:?}");
    assert_identical(a, b).await;
    prim.stop();
    sec.stop().await;
    (overlapped, v)
}

/// A full sync to an empty peer of a volume whose blocks lie in the log far from volume order (48
/// MiB written block by block in a scattered order, then holes trimmed into it), while clients
/// write: the copy reads in log order (sorted off the loop: 12,288 places), and leaves identical
/// replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_sync_of_a_scattered_volume_racing_with_clients_leaves_identical_replicas() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = stores(dir.path()).await;
    let va = a.volume("v").await.unwrap().id;
    let n = (48u64 << 20) / BLOCK_BYTES_U64;
    for i in 0..n {
        // 7919 is prime, so prime to n = 12,288: every block once, neighbours far apart in the log.
        let lba = i * 7919 % n;
        a.write(va, lba * BLOCK_BYTES_U64, data(lba, BLOCK_BYTES), false).await.unwrap();
    }
    for lba in (100..n).step_by(1000) {
        a.trim(va, lba * BLOCK_BYTES_U64, 16 * BLOCK_BYTES_U64).await.unwrap();
    }
    a.flush().await.unwrap();
    let (overlapped, v) = full_sync_racing_with_clients(&a, &b, 2, 500, Duration::ZERO).await;
    println!(
        "scattered full sync: {overlapped} client operations during it; shipped {} bytes, skipped {}",
        v.resync_bytes_shipped, v.resync_bytes_skipped
    );
    assert!(v.resync_full);
    // Every mapped block, less the few the clients trimmed before their comparison.
    assert!(v.resync_bytes_shipped > 44 << 20, "{v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_no_difference_on_a_healthy_pair_under_load() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = stores(dir.path()).await;
    let (prim, sec) = start_pair(&a, &b).await;
    wait_in_sync(&prim).await;
    for k in 0..16u64 {
        prim.write(k * (4 << 20), data(k, 1 << 20), false).await.unwrap();
    }
    let stop = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..4u64).map(|t| workload(&prim, 77 + t, stop.clone(), || true)).collect();
    let mut passes = 0;
    let t = Instant::now();
    while passes < 3 || t.elapsed() < Duration::from_millis(500) {
        let report = prim.verify(false).await.unwrap();
        assert_eq!(report.blocks_differing, 0, "false difference under load: {report:?}");
        assert_eq!(report.bytes_compared, VOL_BYTES);
        passes += 1;
    }
    stop.store(1, Ordering::Relaxed);
    let mut ops = 0;
    for w in writers {
        ops += w.await.unwrap();
    }
    println!("{passes} verify passes, {ops} client operations racing with them, no difference");
    assert!(ops > 0);
    let st = prim.status().await;
    let v = &st.peer.verify;
    assert!(!v.active() && v.bytes_done == VOL_BYTES && v.rate_bytes_per_sec_at(Instant::now()) > 0, "{v:?}");
    let json = serde_json::to_string(&NodeStatus::Primary(st.clone()).view()).unwrap();
    for key in [
        "\"lag_bytes\":",
        "\"verify\":{\"active\":false",
        "\"rate_bytes_per_sec\":",
        "\"eta_secs\":null",
        "\"last\":{\"bytes_compared\":67108864,\"blocks_differing\":0",
    ] {
        assert!(json.contains(key), "{key} missing in {json}");
    }
    prim.stop();
    sec.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_blocks_changed_behind_the_primarys_back_and_repairs_them() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = stores(dir.path()).await;
    let (prim, sec) = start_pair(&a, &b).await;
    wait_in_sync(&prim).await;
    for k in 0..8u64 {
        prim.write(k << 20, data(k, 1 << 20), false).await.unwrap();
    }
    prim.flush().await.unwrap();
    let vb = b.volume("v").await.unwrap().id;
    // Behind the replicator's back, on the secondary: two adjacent blocks and one more rewritten,
    // one block trimmed, one written where the primary has a hole.
    b.write(vb, 10 * BLOCK_BYTES_U64, data(1, 2 * BLOCK_BYTES), false).await.unwrap();
    b.write(vb, 1000 * BLOCK_BYTES_U64, data(2, BLOCK_BYTES), false).await.unwrap();
    b.trim(vb, 1500 * BLOCK_BYTES_U64, BLOCK_BYTES_U64).await.unwrap();
    b.write(vb, (40 << 20) + 3 * BLOCK_BYTES_U64, data(3, BLOCK_BYTES), false).await.unwrap();
    let report = prim.verify(false).await.unwrap();
    println!("verify found {report:?}");
    assert_eq!(report.blocks_differing, 5);
    let range = |offset, len| ByteRange { offset, len };
    assert_eq!(
        report.ranges,
        [
            range(10 * BLOCK_BYTES_U64, 2 * BLOCK_BYTES_U64),
            range(1000 * BLOCK_BYTES_U64, BLOCK_BYTES_U64),
            range(1500 * BLOCK_BYTES_U64, BLOCK_BYTES_U64),
            range((40 << 20) + 3 * BLOCK_BYTES_U64, BLOCK_BYTES_U64)
        ]
    );
    assert_eq!(report.blocks_repaired, 0);
    assert_eq!(prim.status().await.peer.last_verify, Some(report));
    // Nothing was repaired: the peer still differs.
    assert!(image(&a).await != image(&b).await);

    let report = prim.verify(true).await.unwrap();
    assert_eq!((report.blocks_differing, report.blocks_repaired), (5, 5));
    let after = prim.verify(false).await.unwrap();
    assert_eq!(after.blocks_differing, 0, "{after:?}");
    prim.flush().await.unwrap();
    assert_identical(&a, &b).await;

    // Without an in-sync peer there is nothing to compare with.
    sec.stop().await;
    let mut w = prim.peer_view();
    w.wait_for(|v| !v.connected).await.unwrap();
    let err = prim.verify(false).await.unwrap_err().to_string();
    assert!(err.contains("in sync"), "{err}");
    prim.stop();
}
