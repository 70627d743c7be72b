//! Reproductions of engine bugs found by the crash and fuzz tests, one scenario each, so that a fix
//! is pinned down. Each test bounds its wait, so a regression fails quickly instead of hanging.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use syncblock_engine::format::{CheckpointHeader, Superblock};
use syncblock_engine::sim::SimDisk;
use syncblock_engine::{Config, Lsn, BLOCK_BYTES};

/// Longer than any flush on the simulated device takes, short enough to fail fast.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// A FLUSH with nothing unsynced must still be answered. (Found by `kill9`: the child's first
/// flush after creating its volume never returned. Fixed in eedfc09, "sync reply fix".) The core
/// queued such a flush as a sync waiter whose LSN was already durable; `step_syncs` only starts a
/// sync for waiters *above* `durable_lsn`, and waiters were only answered when a sync completed, so
/// the flush waited for some later write to trigger a sync: forever on an idle store.
#[test]
fn flush_with_nothing_unsynced_returns() {
    let disk = sim_disk(16 << 20, 1 << 20);
    let rt = rt();
    let store = open_sim(&disk, Config::default()).unwrap();
    let flush = |what: &str| {
        rt.block_on(async { tokio::time::timeout(FLUSH_TIMEOUT, store.flush()).await })
            .unwrap_or_else(|_| panic!("flush {what} did not return within {FLUSH_TIMEOUT:?}"))
            .unwrap();
    };
    flush("on a freshly opened store");
    let vol = rt.block_on(store.create_volume("v", 1 << 20)).unwrap();
    flush("after a volume create (already durable)");
    rt.block_on(store.write(vol.id, 0, Bytes::from(pattern(1, BLOCK_BYTES)), false)).unwrap();
    flush("after a write");
    flush("right after another flush");
    store.close().unwrap();
}

/// Edits the checkpoint header of a freshly formatted sim disk (its one checkpoint, seq 1, is in
/// slot 1) and re-seals it, as a bug that wrote wrong metadata, or a forged image, would leave it.
fn forge_checkpoint_header(disk: &std::sync::Arc<std::sync::Mutex<SimDisk>>, edit: impl Fn(&mut CheckpointHeader)) {
    let mut d = disk.lock().unwrap();
    let sb = Superblock::decode(&d.written[..BLOCK_BYTES]).unwrap();
    let at = sb.checkpoint_offsets[1] as usize;
    let mut header = CheckpointHeader::decode(&d.written[at..at + BLOCK_BYTES], sb.store_id).unwrap();
    edit(&mut header);
    d.written[at..at + BLOCK_BYTES].copy_from_slice(&header.encode());
}

/// A checkpoint whose header passes its CRC but says `next_lsn = 0` must be rejected, not trusted.
/// (Found by the `open_corrupted` fuzzer with re-sealed checksums; fixed in ce72eaa.)
/// `recovery::recover` computed `Lsn(h.next_lsn.0 - 1)` (`max_lsn_seen`) before anything checked
/// that LSNs start at 1: with overflow checks (debug, fuzz builds) opening panicked with "attempt
/// to subtract with overflow"; without them it wrapped to u64::MAX and `max_lsn_seen.0 + 1` wrapped
/// back to 0, so the store would have served with `next_lsn = 0`.
#[test]
fn checkpoint_with_next_lsn_zero_is_rejected_not_trusted() {
    check_forged_checkpoint_is_rejected("next_lsn = 0", |h| h.next_lsn = Lsn(0));
}

/// Opening a store whose checkpoint header `edit` forged (`what` it says) fails, and does not panic.
fn check_forged_checkpoint_is_rejected(what: &str, edit: impl Fn(&mut CheckpointHeader)) {
    let disk = sim_disk(16 << 20, 1 << 20);
    forge_checkpoint_header(&disk, edit);
    let opened = std::panic::catch_unwind(|| open_sim(&disk, Config::default()).map(|s| s.close()));
    match opened {
        Err(_) => panic!("opening a store whose checkpoint says {what} panicked"),
        Ok(r) => assert!(r.is_err(), "a checkpoint with {what} was trusted"),
    }
}

/// A checkpoint whose header passes its CRC but whose `seq` is near `u64::MAX` must be rejected at
/// open, like `next_lsn` and `next_segment_seq` are (commit ce72eaa). Otherwise the next
/// checkpoints compute `self.ckpt_seq + 1` (core.rs, `step_checkpoint`): with overflow checks the
/// engine thread panics at the first checkpoint past `u64::MAX`; without them `seq` wraps to 0 and
/// the slot still holding the `u64::MAX` checkpoint wins at the next open ("higher seq wins"),
/// so recovery would start from a stale checkpoint.
#[test]
fn checkpoint_with_seq_near_u64_max_is_rejected_not_trusted() {
    // Odd, so it stays in slot 1 where seq 1 was; two checkpoints later seq would pass u64::MAX.
    check_forged_checkpoint_is_rejected("seq = u64::MAX - 2", |h| h.seq = u64::MAX - 2);
}

/// When the engine thread dies (here: a panic in `step_checkpoint`, see the test above), later
/// calls must fail (e.g. with `ShutDown`), not wait forever: `drive` is not unwound past, so
/// `inner.closed` is never set and requests queued after the panic are never answered. An NBD
/// client would hang instead of getting EIO, and `Store::close` hangs too. Only reproducible where
/// integer overflow panics (debug builds): the trigger is the `seq + 1` overflow.
#[test]
fn calls_after_the_engine_thread_died_fail_instead_of_hanging() {
    if !cfg!(debug_assertions) {
        println!("SKIP: the trigger (an overflow panic on the engine thread) needs overflow checks");
        return;
    }
    let disk = sim_disk(16 << 20, 1 << 20);
    forge_checkpoint_header(&disk, |h| h.seq = u64::MAX - 2);
    let Ok(store) = open_sim(&disk, Config::default()) else {
        println!("SKIP: the forged checkpoint is rejected at open, so there is no trigger left");
        return;
    };
    let rt = rt();
    rt.block_on(async {
        // seq u64::MAX - 1 was the recovery checkpoint; u64::MAX now; the next one overflows.
        let _ = store.checkpoint().await;
        let _ = store.checkpoint().await;
        let flushed = tokio::time::timeout(FLUSH_TIMEOUT, store.flush()).await;
        assert!(flushed.is_ok(), "flush after the engine thread died did not return within {FLUSH_TIMEOUT:?}");
    });
}

/// A resize queued behind a write still in flight must not overtake it: the live engine and
/// replay must agree. (Found while documenting the format: the write used to be applied after
/// a shrink and a grow that came later in the log, so reads changed across a crash.)
#[test]
fn resize_does_not_overtake_a_write_in_flight() {
    let rt = rt();
    let (disk, store, vol) = sim_volume(&rt, 16 << 20, 1 << 20);
    let at = 200 * BLOCK_BYTES as u64;
    rt.block_on(async {
        let (w, a, b) = tokio::join!(
            store.write(vol.id, at, Bytes::from(vec![7u8; BLOCK_BYTES]), false),
            store.resize_volume(vol.id, 100 * BLOCK_BYTES as u64),
            store.resize_volume(vol.id, 1 << 20),
        );
        w.unwrap();
        a.unwrap();
        b.unwrap();
    });
    rt.block_on(store.flush()).unwrap();
    let live = rt.block_on(store.read(vol.id, at, BLOCK_BYTES as u64)).unwrap();
    let (_crashed, store) = open_image(crash(store, &disk));
    let store = store.unwrap();
    let recovered = rt.block_on(store.read(vol.id, at, BLOCK_BYTES as u64)).unwrap();
    assert_eq!(live, recovered, "the live engine and recovery disagree");
    assert!(live.iter().all(|b| *b == 0), "the shrink came after the write, so the block is gone");
}

/// Dropping the last handle without `close()` stops the engine thread and releases the device.
/// (Found by the replicator's simulation, which leaked ~700 MB per seed: every store it replaced
/// kept its thread, index and simulated disk. The engine thread held the `Arc` that owned its own
/// `JoinHandle`, so the "last handle dropped" shutdown could never run.)
#[test]
fn dropping_the_last_handle_stops_the_engine_and_releases_the_device() {
    let rt = rt();
    let (disk, store, vol) = sim_volume(&rt, 16 << 20, 1 << 20);
    rt.block_on(store.write(vol.id, 0, Bytes::from(pattern(1, BLOCK_BYTES)), false)).unwrap();
    let clone = store.clone();
    drop(store);
    assert!(std::sync::Arc::strong_count(&disk) > 1, "a live clone keeps the engine running");
    rt.block_on(clone.flush()).unwrap();
    drop(clone);
    // The drop joined the engine thread, which dropped the device (and its handle on the disk).
    assert_eq!(std::sync::Arc::strong_count(&disk), 1, "the engine thread outlived the last handle");
    // It stopped cleanly: the write is there after reopening.
    let store = open_sim(&disk, Config::default()).unwrap();
    let read = rt.block_on(store.read(vol.id, 0, BLOCK_BYTES as u64)).unwrap();
    assert_eq!(&read[..], &pattern(1, BLOCK_BYTES)[..]);
    store.close().unwrap();
}
