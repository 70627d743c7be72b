//! Boundary tests of the engine's public API on the simulated device and on a real file.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use syncblock_engine::sim::{SimDevice, SimDisk};
use syncblock_engine::{
    BlockRun, Config, CreateOptions, Driver, Error, Lba, Store, Tag, VolumeId, VolumeInfo, BLOCK_BYTES,
};

#[test]
fn write_read_flush_reopen_on_sim() {
    let rt = rt();
    let (disk, store, vol) = sim_volume(&rt, 64 << 20, 16 << 20);
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
    let rt = rt();
    let (_disk, store, vol) = sim_volume(&rt, 16 << 20, 1 << 20);
    let e = rt.block_on(store.write(vol.id, (1 << 20) - 10, Bytes::from(vec![1u8; 20]), false)).unwrap_err();
    assert!(matches!(e, Error::OutOfRange { .. }), "{e}");
    let e = rt.block_on(store.read(syncblock_engine::VolumeId(99), 0, 1)).unwrap_err();
    assert!(matches!(e, Error::NoSuchVolume(_)), "{e}");
    let e = rt.block_on(store.create_volume("v", 1 << 20)).unwrap_err();
    assert!(matches!(e, Error::VolumeExists(_)), "{e}");
    store.close().unwrap();
}

/// A copy's reads in log order refuse what a client read would: blocks outside the volume, too
/// many at once, runs out of order; and a block read in log order is checked against its checksum
/// like any other.
#[test]
fn reads_in_log_order_refuse_bad_requests_and_find_corruption() {
    let rt = rt();
    let (disk, store, vol) = sim_volume(&rt, 16 << 20, 1 << 20);
    let read = |lbas: Vec<u64>| rt.block_on(async { store.enqueue_read_blocks(vol.id, lbas).await?.wait().await });
    let e = read(vec![0, 256]).unwrap_err();
    assert!(matches!(e, Error::OutOfRange { .. }), "{e}");
    let e = read(vec![u64::MAX]).unwrap_err();
    assert!(matches!(e, Error::OutOfRange { .. }), "{e}");
    let e = read(vec![0; syncblock_engine::SCATTERED_BLOCKS_MAX + 1]).unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e}");
    let run = |lba, n_blocks| BlockRun { lba: Lba(lba), n_blocks };
    for bad in [vec![run(4, 2), run(0, 2)], vec![run(0, 4), run(2, 4)], vec![run(250, 7)], vec![run(u64::MAX, 2)]] {
        let e = rt.block_on(store.block_places(vol.id, bad.clone())).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{bad:?}: {e}");
    }
    let e = rt.block_on(store.block_places(VolumeId(99), vec![run(0, 1)])).unwrap_err();
    assert!(matches!(e, Error::NoSuchVolume(_)), "{e}");
    // Even naming no block (this once panicked the engine's thread).
    let e = rt.block_on(async { store.enqueue_read_blocks(VolumeId(99), vec![]).await?.wait().await }).unwrap_err();
    assert!(matches!(e, Error::NoSuchVolume(_)), "{e}");
    let write = |blocks: Vec<(u64, Bytes)>| {
        rt.block_on(async { store.enqueue_write_blocks(vol.id, blocks, Tag::NONE).await?.wait().await })
    };
    let block = Bytes::from(pattern(9, BLOCK_BYTES));
    let e = write(vec![(0, block.clone()), (256, block.clone())]).unwrap_err();
    assert!(matches!(e, Error::OutOfRange { .. }), "{e}");
    let e = write(vec![(u64::MAX, block.clone())]).unwrap_err();
    assert!(matches!(e, Error::OutOfRange { .. }), "{e}");
    let e = write(vec![(0, block.slice(1..))]).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    let e = write(vec![(0, block.clone()); syncblock_engine::SCATTERED_BLOCKS_MAX + 1]).unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e}");
    assert!(read(vec![0]).unwrap()[0].is_none(), "a refused write wrote nothing");

    // Blocks 3, 1 and 0 written in that order lie in the log in that order.
    for (lba, seed) in [(3, 3), (1, 1), (0, 0)] {
        rt.block_on(store.write(vol.id, lba * 4096, Bytes::from(pattern(seed, BLOCK_BYTES)), false)).unwrap();
    }
    rt.block_on(store.flush()).unwrap();
    let mut places = rt.block_on(store.block_places(vol.id, vec![run(0, 8)])).unwrap();
    assert_eq!(places.iter().map(|p| p.lba).collect::<Vec<_>>(), [0, 1, 3]);
    places.sort_unstable();
    assert_eq!(places.iter().map(|p| p.lba).collect::<Vec<_>>(), [3, 1, 0]);
    let got = read(vec![3, 2, 1, 0]).unwrap();
    assert_eq!(got[1], None);
    for (i, seed) in [(0, 3), (2, 1), (3, 0)] {
        assert_eq!(got[i].as_deref(), Some(&pattern(seed, BLOCK_BYTES)[..]), "block {i}");
    }

    // Flip a byte of block 1 on the disk: its read in log order fails, naming the corruption.
    {
        let mut d = disk.lock().unwrap();
        let block = pattern(1, BLOCK_BYTES);
        let at = d.written.chunks(BLOCK_BYTES).position(|b| b == &block[..]).expect("block 1 on the disk");
        d.written[at * BLOCK_BYTES + 17] ^= 0xff;
    }
    let e = read(vec![0, 1, 3]).unwrap_err();
    assert!(matches!(e, Error::Corrupt { .. }), "{e}");
    assert_eq!(read(vec![0, 3]).unwrap().len(), 2);
    store.close().unwrap();
}

#[test]
fn real_file_store_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.img");
    let rt = rt();
    let store = Store::create(
        &path,
        &CreateOptions { size_bytes: 64 << 20, segment_bytes: 1 << 20, zero_fill: false },
        Config::default(),
    )
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
fn zero_fill_leaves_no_hole_in_a_new_store_file() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    for zero_fill in [false, true] {
        let path = dir.path().join(format!("store-{zero_fill}.img"));
        let size = 48u64 << 20;
        let opts = CreateOptions { size_bytes: size, segment_bytes: 1 << 20, zero_fill };
        let store = Store::create(&path, &opts, Config::default()).unwrap();
        let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
        if zero_fill {
            assert!(allocated >= size, "zero-filled: {allocated} of {size} bytes allocated");
        } else {
            assert!(allocated < size / 2, "sparse: {allocated} of {size} bytes allocated");
        }
        let vol = rt.block_on(store.create_volume("v", 16 << 20)).unwrap();
        rt.block_on(store.write(vol.id, 0, Bytes::from(pattern(3, 8192)), true)).unwrap();
        assert_eq!(&rt.block_on(store.read(vol.id, 0, 8192)).unwrap()[..], &pattern(3, 8192)[..]);
        store.close().unwrap();
    }
}

#[test]
fn a_store_can_be_open_only_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.img");
    let store = Store::create(
        &path,
        &CreateOptions { size_bytes: 16 << 20, segment_bytes: 1 << 20, zero_fill: false },
        Config::default(),
    )
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
    let rt = rt();
    let (disk, store, vol) = sim_volume(&rt, 64 << 20, 16 << 20);
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

/// A store whose engine runs on the caller's multi-threaded runtime ([`Driver::Runtime`]) serves
/// many concurrent requests from tasks on that runtime, closes cleanly (the reopen replays
/// nothing), and a store dropped without `close()` lets go of its file.
#[test]
fn engine_on_the_callers_runtime_serves_closes_and_stops_when_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.img");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let cfg = Config { driver: Driver::Runtime(rt.handle().clone()), ..Config::default() };
    let opts = CreateOptions { size_bytes: 64 << 20, segment_bytes: 1 << 20, zero_fill: false };
    let store = Store::create(&path, &opts, cfg.clone()).unwrap();
    let vol = rt.block_on(store.create_volume("v", 32 << 20)).unwrap();
    let n_tasks = 64u64;
    rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..n_tasks {
            let store = store.clone();
            tasks.spawn(async move {
                for round in 0..8u64 {
                    let lba = t * 8 + round;
                    let data = pattern(lba, BLOCK_BYTES);
                    store.write(vol.id, lba * 4096, Bytes::from(data.clone()), round % 4 == 3).await.unwrap();
                    if round % 2 == 1 {
                        store.flush().await.unwrap();
                    }
                    let got = store.read(vol.id, lba * 4096, 4096).await.unwrap();
                    assert!(got[..] == data[..], "lba {lba} read back wrong");
                }
            });
        }
        // Bounded: an engine that missed a completion's wakeup would stall here, not hang CI.
        tokio::time::timeout(std::time::Duration::from_secs(60), async {
            while let Some(r) = tasks.join_next().await {
                r.unwrap();
            }
        })
        .await
        .expect("requests stalled: the engine missed a wakeup");
    });
    // From outside the runtime, which keeps running meanwhile.
    store.close().unwrap();
    let e = rt.block_on(store.stats()).unwrap_err();
    assert!(matches!(e, Error::ShutDown), "{e}");

    let store = Store::open(&path, cfg).unwrap();
    assert_eq!(store.recovery_report().records_replayed, 0, "a closed store needed replay");
    let got = rt.block_on(store.read(vol.id, 0, n_tasks * 8 * 4096)).unwrap();
    for lba in 0..n_tasks * 8 {
        let at = lba as usize * BLOCK_BYTES;
        assert!(got[at..at + BLOCK_BYTES] == pattern(lba, BLOCK_BYTES)[..], "lba {lba} lost across close");
    }
    // Dropped without close: the engine stops on its own and releases the store's lock.
    drop(store);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let reopened = loop {
        match Store::open(&path, Config::default()) {
            Ok(s) => break s,
            Err(e) if std::time::Instant::now() < deadline && e.to_string().contains("in use") => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("the dropped store's engine never let go of the file: {e}"),
        }
    };
    reopened.close().unwrap();
}

/// A single-threaded runtime on a paused clock: simulated device latency takes virtual time.
fn paused_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap()
}

/// The engine on the calling runtime (call from inside it).
fn on_this_runtime() -> Config {
    Config { driver: Driver::Runtime(tokio::runtime::Handle::current()), ..Config::default() }
}

/// A store on `disk` behind a simulated device whose I/O takes about `latency`, on the calling
/// runtime, and its new volume "v" of `volume_bytes`.
async fn latency_volume(disk: &Arc<Mutex<SimDisk>>, latency: Duration, volume_bytes: u64) -> (Store, VolumeInfo) {
    let dev = SimDevice::new(disk.clone()).with_latency(latency, 7);
    let store = Store::open_device_async(Box::new(dev), on_this_runtime(), "sim").await.unwrap();
    let vol = store.create_volume("v", volume_bytes).await.unwrap();
    (store, vol)
}

/// The image a crash now would leave: what the device completed, not what is still in flight.
fn crash_image_now(disk: &Arc<Mutex<SimDisk>>) -> Vec<u8> {
    let d = disk.lock().unwrap();
    d.crash_image(d.n_ops(), 1)
}

/// `image` recovered on the calling runtime: the store and its volume "v".
async fn recover_on_this_runtime(image: Vec<u8>) -> (Store, VolumeId) {
    let dev = Box::new(SimDevice::new(SimDisk::new(image)));
    let store = Store::open_device_async(dev, on_this_runtime(), "sim").await.unwrap();
    let vol = store.volume("v").await.unwrap();
    (store, vol.id)
}

/// A simulated device with latency, on a virtual clock: a write takes virtual time, other tasks run
/// meanwhile, and a crash image taken while it is in flight does not hold it.
#[test]
fn sim_device_latency_takes_virtual_time_and_a_crash_meanwhile_misses_the_write() {
    let disk = sim_disk(64 << 20, 1 << 20);
    let rt = paused_rt();
    rt.block_on(async {
        let (store, vol) = latency_volume(&disk, Duration::from_micros(400), 16 << 20).await;
        let t0 = tokio::time::Instant::now();
        store.write(vol.id, 0, Bytes::from(pattern(1, BLOCK_BYTES)), true).await.unwrap();
        let took = t0.elapsed();
        assert!(took >= Duration::from_micros(100), "a FUA write took {took:?} of virtual time");

        // A write in flight: the task that issued it waits; a crash image now lacks it.
        let (s2, id) = (store.clone(), vol.id);
        let w = tokio::spawn(async move { s2.write(id, 4096, Bytes::from(pattern(2, BLOCK_BYTES)), true).await });
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        assert!(!w.is_finished(), "the write completed without virtual time passing");
        let image = crash_image_now(&disk);
        w.await.unwrap().unwrap();
        let (reopened, v) = recover_on_this_runtime(image).await;
        let first = reopened.read(v, 0, BLOCK_BYTES as u64).await.unwrap();
        assert_eq!(&first[..], &pattern(1, BLOCK_BYTES)[..], "the durable write survives");
        let second = reopened.read(v, 4096, BLOCK_BYTES as u64).await.unwrap();
        assert!(second.iter().all(|b| *b == 0), "the write in flight at the crash is not there");
        drop(reopened);
        drop(store);
    });
}

#[test]
fn write_back_is_answered_before_the_disk_has_it_and_the_next_flush_makes_it_durable() {
    let disk = sim_disk(64 << 20, 1 << 20);
    let rt = paused_rt();
    rt.block_on(async {
        let (store, vol) = latency_volume(&disk, Duration::from_micros(400), 16 << 20).await;
        let data = pattern(1, 2 * BLOCK_BYTES);
        let t0 = tokio::time::Instant::now();
        store.write_back(vol.id, 4096, Bytes::from(data.clone())).await.unwrap();
        assert_eq!(t0.elapsed(), Duration::ZERO, "answered without waiting for the device");
        assert_eq!(&store.read(vol.id, 4096, 2 * BLOCK_BYTES as u64).await.unwrap()[..], &data[..], "reads see it");
        assert_eq!(store.stats().await.unwrap().write_back_acks, 1);
        let before_flush = crash_image_now(&disk);
        store.flush().await.unwrap();
        assert!(t0.elapsed() >= Duration::from_micros(100), "the flush waited for the log write");
        let after_flush = crash_image_now(&disk);
        for (image, expect_data) in [(before_flush, false), (after_flush, true)] {
            let (reopened, v) = recover_on_this_runtime(image).await;
            let got = reopened.read(v, 4096, 2 * BLOCK_BYTES as u64).await.unwrap();
            if expect_data {
                assert_eq!(&got[..], &data[..], "flushed write-back data survives a crash");
            } else {
                assert!(got.iter().all(|b| *b == 0), "a crash before the log write loses the unflushed write");
            }
        }
        drop(store);
    });
}

#[test]
fn write_back_answers_at_most_its_budget_ahead_of_the_disk() {
    use syncblock_engine::core::WRITE_BACK_BLOCKS_MAX;
    let disk = sim_disk(256 << 20, 4 << 20);
    let rt = paused_rt();
    rt.block_on(async {
        let (store, vol) = latency_volume(&disk, Duration::from_millis(5), 128 << 20).await;
        // 1 MiB writes: the budget holds exactly this many before any log write completes.
        let per_write = 256u64;
        let within = (WRITE_BACK_BLOCKS_MAX / per_write) as usize;
        let t0 = tokio::time::Instant::now();
        let tasks: Vec<_> = (0..within + 4)
            .map(|i| {
                let (s, id) = (store.clone(), vol.id);
                let data = Bytes::from(pattern(i as u64, (per_write as usize) * BLOCK_BYTES));
                tokio::spawn(async move { s.write_back(id, i as u64 * (1 << 20), data).await })
            })
            .collect();
        for _ in 0..200 {
            tokio::task::yield_now().await;
        }
        assert_eq!(t0.elapsed(), Duration::ZERO, "no virtual time has passed yet");
        let answered = tasks.iter().filter(|t| t.is_finished()).count();
        assert_eq!(answered, within, "writes answered before the disk completed anything");
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert!(t0.elapsed() >= Duration::from_millis(5), "the rest waited for log writes");
        let st = store.stats().await.unwrap();
        assert!(st.write_back_acks >= within as u64, "{st:?}");
        for i in 0..within + 4 {
            let got = store.read(vol.id, i as u64 * (1 << 20), 1 << 20).await.unwrap();
            assert_eq!(&got[..], &pattern(i as u64, (per_write as usize) * BLOCK_BYTES)[..]);
        }
        drop(store);
    });
}

#[test]
fn write_back_writes_answered_before_close_are_there_after_reopen() {
    let rt = rt();
    let (disk, store, vol) = sim_volume(&rt, 64 << 20, 16 << 20);
    let mut expect = Vec::new();
    for i in 0..64u64 {
        let data = pattern(100 + i, BLOCK_BYTES);
        rt.block_on(store.write_back(vol.id, i * 3 * 4096, Bytes::from(data.clone()))).unwrap();
        expect.push(data);
    }
    assert!(rt.block_on(store.stats()).unwrap().write_back_acks > 0);
    // No flush: a clean close alone must keep every answered write (SIGTERM does this).
    store.close().unwrap();
    let store = open_sim(&disk, Config::default()).unwrap();
    let vol = rt.block_on(store.volume("v")).unwrap();
    for (i, data) in expect.iter().enumerate() {
        let got = rt.block_on(store.read(vol.id, i as u64 * 3 * 4096, BLOCK_BYTES as u64)).unwrap();
        assert_eq!(&got[..], &data[..], "block {i}");
    }
}
