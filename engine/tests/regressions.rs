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
/// flush after creating its volume never returned.) The core queues such a flush as a sync waiter
/// whose LSN is already durable; `step_syncs` only starts a sync for waiters *above* `durable_lsn`,
/// and waiters are only answered when a sync completes, so the flush waits until some later write
/// happens to trigger a sync, forever on an idle store.
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

/// Writes `header` over the checkpoint slot header at `slot` of a formatted sim disk.
fn forge_checkpoint_header(disk: &std::sync::Arc<std::sync::Mutex<SimDisk>>, edit: impl Fn(&mut CheckpointHeader)) {
    let mut d = disk.lock().unwrap();
    let sb = Superblock::decode(&d.written[..BLOCK_BYTES]).unwrap();
    // A fresh store has its one checkpoint (seq 1) in slot 1.
    let at = sb.checkpoint_offsets[1] as usize;
    let mut header = CheckpointHeader::decode(&d.written[at..at + BLOCK_BYTES], sb.store_id).unwrap();
    edit(&mut header);
    d.written[at..at + BLOCK_BYTES].copy_from_slice(&header.encode());
}

/// A checkpoint whose header passes its CRC but says `next_lsn = 0` must be rejected, not trusted.
/// (Found by the `open_corrupted` fuzzer with re-sealed checksums.) `recovery::recover` computes
/// `Lsn(h.next_lsn.0 - 1)` (recovery.rs, `max_lsn_seen`) before anything checks that LSNs start at
/// 1: with overflow checks (debug, fuzz builds) opening panics with "attempt to subtract with
/// overflow"; without them it wraps to u64::MAX and `max_lsn_seen.0 + 1` wraps back to 0, so the
/// store would serve with `next_lsn = 0`. `validate_checkpoint` should reject `next_lsn == 0` (and
/// `next_segment_seq == 0`, which the same arithmetic style assumes is positive).
#[test]
fn checkpoint_with_next_lsn_zero_is_rejected_not_trusted() {
    let disk = sim_disk(16 << 20, 1 << 20);
    forge_checkpoint_header(&disk, |h| h.next_lsn = Lsn(0));
    let opened = std::panic::catch_unwind(|| open_sim(&disk, Config::default()).map(|s| s.close()));
    match opened {
        Err(_) => panic!("opening a store whose checkpoint says next_lsn = 0 panicked"),
        Ok(r) => assert!(r.is_err(), "a checkpoint with next_lsn = 0 was trusted"),
    }
}
