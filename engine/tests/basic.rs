//! Boundary tests of the engine's public API on the simulated device and on a real file.

mod common;

use bytes::Bytes;
use common::*;
use syncblock_engine::{Config, CreateOptions, Error, Store, BLOCK_BYTES};

#[test]
fn write_read_flush_reopen_on_sim() {
    let disk = sim_disk(64 << 20, 1 << 20);
    let rt = rt();
    let store = open_sim(&disk, Config::default()).unwrap();
    let vol = rt.block_on(store.create_volume("v", 16 << 20)).unwrap();
    let a = pattern(1, 3 * BLOCK_BYTES);
    rt.block_on(store.write(vol.id, 8192, Bytes::from(a.clone()), false)).unwrap();
    // Unaligned write over the middle.
    rt.block_on(store.write(vol.id, 8192 + 100, Bytes::from(vec![7u8; 50]), false)).unwrap();
    let mut expect = a.clone();
    expect[100..150].fill(7);
    let got = rt.block_on(store.read(vol.id, 8192, 3 * BLOCK_BYTES as u64)).unwrap();
    assert_eq!(&got[..], &expect[..]);
    // Unwritten reads as zeros.
    let z = rt.block_on(store.read(vol.id, 1 << 20, 4096)).unwrap();
    assert!(z.iter().all(|b| *b == 0));
    rt.block_on(store.flush()).unwrap();
    store.close().unwrap();
    let store = open_sim(&disk, Config::default()).unwrap();
    let vol = rt.block_on(store.volume("v")).unwrap();
    let got = rt.block_on(store.read(vol.id, 8192, 3 * BLOCK_BYTES as u64)).unwrap();
    assert_eq!(&got[..], &expect[..]);
    store.close().unwrap();
}

#[test]
fn out_of_range_and_missing_volume_are_errors() {
    let disk = sim_disk(16 << 20, 1 << 20);
    let rt = rt();
    let store = open_sim(&disk, Config::default()).unwrap();
    let vol = rt.block_on(store.create_volume("v", 1 << 20)).unwrap();
    let e = rt.block_on(store.write(vol.id, (1 << 20) - 10, Bytes::from(vec![1u8; 20]), false)).unwrap_err();
    assert!(matches!(e, Error::OutOfRange { .. }), "{e}");
    let e = rt.block_on(store.read(syncblock_engine::VolumeId(99), 0, 1)).unwrap_err();
    assert!(matches!(e, Error::NoSuchVolume(_)), "{e}");
    let e = rt.block_on(store.create_volume("v", 1 << 20)).unwrap_err();
    assert!(matches!(e, Error::VolumeExists(_)), "{e}");
    store.close().unwrap();
}

#[test]
fn real_file_store_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.img");
    let rt = rt();
    let store =
        Store::create(&path, &CreateOptions { size_bytes: 64 << 20, segment_bytes: 1 << 20 }, Config::default())
            .unwrap();
    let vol = rt.block_on(store.create_volume("v", 32 << 20)).unwrap();
    let data = pattern(9, 1 << 20);
    rt.block_on(store.write(vol.id, 4096, Bytes::from(data.clone()), true)).unwrap();
    store.close().unwrap();
    let store = Store::open(&path, Config::default()).unwrap();
    let got = rt.block_on(store.read(vol.id, 4096, 1 << 20)).unwrap();
    assert_eq!(&got[..], &data[..]);
    store.close().unwrap();
}

#[test]
fn a_store_can_be_open_only_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.img");
    let store =
        Store::create(&path, &CreateOptions { size_bytes: 16 << 20, segment_bytes: 1 << 20 }, Config::default())
            .unwrap();
    let e = Store::open(&path, Config::default()).unwrap_err();
    assert!(e.to_string().contains("in use by another process"), "{e}");
    store.close().unwrap();
    Store::open(&path, Config::default()).unwrap().close().unwrap();
}

/// A flush with nothing new to make durable costs no device op; one after writes that are not yet
/// durable always syncs; and the write-then-flush pattern gets its writes made durable by a FUA
/// write instead of a sync. (Power-cut safety of all three is in `powercut.rs`.)
#[test]
fn flushes_sync_exactly_what_is_not_durable() {
    let disk = sim_disk(64 << 20, 1 << 20);
    let rt = rt();
    let store = open_sim(&disk, Config::default()).unwrap();
    let vol = rt.block_on(store.create_volume("v", 16 << 20)).unwrap();
    let stats = || rt.block_on(store.stats()).unwrap();
    let write =
        |lba: u64| rt.block_on(store.write(vol.id, lba * 4096, Bytes::from(pattern(lba, 4096)), false)).unwrap();

    // Two batches in a row are no commit pattern: written plainly, so the flush must sync.
    write(1);
    write(2);
    let before = stats();
    rt.block_on(store.flush()).unwrap();
    let after = stats();
    assert_eq!(after.syncs, before.syncs + 1, "{after:?}");
    assert_eq!(after.durable_lsn.0 + 1, after.next_lsn.0, "{after:?}");

    // Nothing written since: no sync, no write.
    let n_ops = disk.lock().unwrap().n_ops();
    for _ in 0..3 {
        rt.block_on(store.flush()).unwrap();
    }
    assert_eq!(disk.lock().unwrap().n_ops(), n_ops, "a flush with nothing to do touched the device");

    // A commit loop: after a few rounds, each write is durable when it completes, no sync needed.
    for lba in 10..20 {
        write(lba);
        rt.block_on(store.flush()).unwrap();
    }
    let looped = stats();
    assert!(looped.durable_writes >= 7, "{looped:?}");
    assert!(looped.syncs <= after.syncs + 3, "{looped:?}");

    // The pattern broken: the plain write after it is synced by the next flush.
    write(30);
    write(31);
    let before = stats();
    rt.block_on(store.flush()).unwrap();
    assert_eq!(stats().syncs, before.syncs + 1);
    store.close().unwrap();
}
