//! The engine's replication support: write tags, the volume's last tag, resync writes, the
//! replication state record, tag scans that find trims even after the cleaner ran, the
//! queue-order promise of `enqueue_*`, and block checksums from the index.

mod common;

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::*;
use syncblock_engine::sim::SimDisk;
use syncblock_engine::{Config, Since, Store, Tag, VolumeId, BLOCK_BYTES, BLOCK_BYTES_U64};

/// Drops the store without its shutdown checkpoint: the reopened store must replay the log.
fn crash_and_reopen(store: Store, disk: &Arc<Mutex<SimDisk>>) -> (Store, Arc<Mutex<SimDisk>>) {
    let (disk, store) = open_image(crash(store, disk));
    (store.unwrap(), disk)
}

async fn tagged_write(store: &Store, vol: VolumeId, lba: u64, seed: u64, tag: Tag) {
    let data = Bytes::from(pattern(seed, BLOCK_BYTES));
    store.enqueue_write(vol, lba * BLOCK_BYTES_U64, data, false, tag).await.unwrap().wait().await.unwrap();
}

async fn tagged_trim(store: &Store, vol: VolumeId, lba: u64, n_blocks: u64, tag: Tag) {
    let (offset, len) = (lba * BLOCK_BYTES_U64, n_blocks * BLOCK_BYTES_U64);
    store.enqueue_trim(vol, offset, len, tag).await.unwrap().wait().await.unwrap();
}

/// One block, read through `rt`.
fn read_block(rt: &tokio::runtime::Runtime, store: &Store, vol: VolumeId, lba: u64) -> Bytes {
    rt.block_on(store.read(vol, lba * BLOCK_BYTES_U64, BLOCK_BYTES_U64)).unwrap()
}

fn runs(r: Vec<syncblock_engine::ChangedRun>) -> Vec<(u64, u64)> {
    r.iter().map(|r| (r.lba.0, r.n_blocks)).collect()
}

#[test]
fn last_tag_follows_tagged_writes_not_resync_writes_and_survives_replay() {
    let rt = rt();
    let (disk, store, vol) = sim_volume(&rt, 16 << 20, 1 << 20);
    assert_eq!(vol.last_tag, 0);
    assert_eq!(vol.trim_floor, u64::MAX, "unreplicated volumes retain no trims");
    rt.block_on(async {
        tagged_write(&store, vol.id, 0, 1, Tag::seq(1)).await;
        tagged_write(&store, vol.id, 1, 2, Tag::seq(2)).await;
        tagged_write(&store, vol.id, 2, 3, Tag::resync(50)).await;
        tagged_trim(&store, vol.id, 3, 1, Tag::seq(3)).await;
        store.write(vol.id, 4 * BLOCK_BYTES_U64, Bytes::from(pattern(9, BLOCK_BYTES)), false).await.unwrap();
        store.flush().await.unwrap();
    });
    assert_eq!(rt.block_on(store.volume_info(vol.id)).unwrap().last_tag, 3);
    let (store, disk) = crash_and_reopen(store, &disk);
    let info = rt.block_on(store.volume_info(vol.id)).unwrap();
    assert_eq!(info.last_tag, 3, "replay recomputes the last tag; resync writes do not move it");

    // A resync commit (or a rollback) sets it explicitly, with the floor and blob, durably.
    rt.block_on(store.set_repl(vol.id, 2, 1, b"state".to_vec())).unwrap();
    let (store, disk) = crash_and_reopen(store, &disk);
    let info = rt.block_on(store.volume_info(vol.id)).unwrap();
    assert_eq!((info.last_tag, info.trim_floor, &info.attr[..]), (2, 1, &b"state"[..]));
    // And from a checkpoint, not only from replay.
    rt.block_on(store.checkpoint()).unwrap();
    let (store, _disk) = crash_and_reopen(store, &disk);
    let info = rt.block_on(store.volume_info(vol.id)).unwrap();
    assert_eq!((info.last_tag, info.trim_floor, &info.attr[..]), (2, 1, &b"state"[..]));
    // An oversized blob is refused.
    assert!(rt.block_on(store.set_repl(vol.id, 2, 1, vec![0; 4096])).is_err());
}

#[test]
fn tag_scan_finds_writes_and_trims_after_a_tag() {
    let rt = rt();
    let (disk, store, vol) = sim_volume(&rt, 16 << 20, 1 << 20);
    rt.block_on(store.set_repl(vol.id, 0, 0, Vec::new())).unwrap();
    rt.block_on(async {
        for lba in 0..8 {
            tagged_write(&store, vol.id, lba, lba, Tag::seq(lba + 1)).await;
        }
        tagged_trim(&store, vol.id, 20, 10, Tag::seq(9)).await;
        tagged_write(&store, vol.id, 3, 100, Tag::seq(10)).await;
        store.flush().await.unwrap();
    });
    let got = runs(rt.block_on(store.changed_since(vol.id, Since::Tag(5))).unwrap());
    // Tags 6..=8 wrote LBAs 5..=7, tag 9 trimmed 20..30, tag 10 rewrote LBA 3.
    assert_eq!(got, [(3, 1), (5, 3), (20, 10)]);
    assert_eq!(runs(rt.block_on(store.changed_since(vol.id, Since::Tag(10))).unwrap()), []);
    let (store, _disk) = crash_and_reopen(store, &disk);
    let got = runs(rt.block_on(store.changed_since(vol.id, Since::Tag(5))).unwrap());
    assert_eq!(got, [(3, 1), (5, 3), (20, 10)]);
}

#[test]
fn trims_above_the_floor_survive_cleaning_and_free_their_space_once_the_floor_passes() {
    let rt = rt();
    // 24 segments of 256 blocks; the volume is 2 MiB (512 blocks), rewritten over and over.
    let (_disk, store, vol) = sim_volume(&rt, 24 << 20, 2 << 20);
    rt.block_on(store.set_repl(vol.id, 0, 0, Vec::new())).unwrap();
    let mut tag = 0u64;
    rt.block_on(async {
        for lba in 0..512 {
            tag += 1;
            tagged_write(&store, vol.id, lba, lba, Tag::seq(tag)).await;
        }
        tag += 1;
        tagged_trim(&store, vol.id, 100, 4, Tag::seq(tag)).await;
    });
    let trim_tag = tag;
    // Rewrite everything (except the trimmed range) several times: the trim's segment becomes
    // all dead and would be cleaned without the pin. Checkpoints let the cleaner reuse segments.
    rt.block_on(async {
        for round in 0..12u64 {
            for lba in (0..512).filter(|l| !(100..104).contains(l)) {
                tag += 1;
                tagged_write(&store, vol.id, lba, round * 1000 + lba, Tag::seq(tag)).await;
            }
            store.checkpoint().await.unwrap();
        }
    });
    let stats = rt.block_on(store.stats()).unwrap();
    let device_blocks = stats.n_segments as u64 * (stats.segment_bytes / BLOCK_BYTES_U64);
    assert!(
        stats.log_blocks_written > 2 * device_blocks,
        "the workload must reuse segments ({} log blocks, {device_blocks} on the device)",
        stats.log_blocks_written
    );
    let got = runs(rt.block_on(store.changed_since(vol.id, Since::Tag(trim_tag - 1))).unwrap());
    // LBAs 100..104 were not written after the trim: only the trim entry can report them.
    let covered = |lba: u64| got.iter().any(|&(first, n)| (first..first + n).contains(&lba));
    assert!((100..104).all(covered), "trim at tag {trim_tag} lost by cleaning: {got:?}");

    // Once the floor passes the trim, its segment is released and the store keeps going.
    rt.block_on(store.set_repl(vol.id, tag, tag, Vec::new())).unwrap();
    rt.block_on(async {
        for round in 0..12u64 {
            for lba in 0..512 {
                tag += 1;
                tagged_write(&store, vol.id, lba, 50_000 + round * 1000 + lba, Tag::seq(tag)).await;
            }
            store.checkpoint().await.unwrap();
        }
    });
    let data = read_block(&rt, &store, vol.id, 511);
    assert_eq!(&data[..], &pattern(50_000 + 11_000 + 511, BLOCK_BYTES)[..]);
}

#[test]
fn a_read_queued_after_a_write_sees_it_and_one_queued_before_does_not() {
    let rt = rt();
    let (_disk, store, vol) = sim_volume(&rt, 16 << 20, 1 << 20);
    rt.block_on(async {
        let before = store.enqueue_read(vol.id, 0, BLOCK_BYTES_U64).await.unwrap();
        let w = store.enqueue_write(vol.id, 0, Bytes::from(pattern(7, BLOCK_BYTES)), false, Tag::seq(1)).await.unwrap();
        let after = store.enqueue_read(vol.id, 0, BLOCK_BYTES_U64).await.unwrap();
        w.wait().await.unwrap();
        assert!(before.wait().await.unwrap().iter().all(|b| *b == 0));
        assert_eq!(&after.wait().await.unwrap()[..], &pattern(7, BLOCK_BYTES)[..]);
    });
}

#[test]
fn block_crcs_see_every_queued_write_and_trim_and_read_no_data() {
    use syncblock_engine::format::block_crc;
    let rt = rt();
    let disk = sim_disk(16 << 20, 1 << 20);
    let store = open_sim(&disk, Config::default()).unwrap();
    let n_blocks = 64u64;
    let vol = rt.block_on(store.create_volume("v", n_blocks * BLOCK_BYTES_U64)).unwrap();
    // The model: each block's bytes, or None while unmapped.
    let mut model: Vec<Option<Vec<u8>>> = vec![None; n_blocks as usize];
    let mut rng = syncblock_engine::sim::Rng::new(7);
    rt.block_on(async {
        for round in 0..200u64 {
            let lba = rng.below(n_blocks);
            let pending = match rng.below(4) {
                0 => {
                    let n = 1 + rng.below(3).min(n_blocks - lba - 1);
                    for l in lba..lba + n {
                        model[l as usize] = None;
                    }
                    store.enqueue_trim(vol.id, lba * BLOCK_BYTES_U64, n * BLOCK_BYTES_U64, Tag::NONE).await.unwrap()
                }
                1 => {
                    // A sector inside the block: read-modify-write, mapped afterwards.
                    let data = pattern(round, 512);
                    let b = model[lba as usize].get_or_insert_with(|| vec![0; BLOCK_BYTES]);
                    b[1024..1536].copy_from_slice(&data);
                    store
                        .enqueue_write(vol.id, lba * BLOCK_BYTES_U64 + 1024, Bytes::from(data), false, Tag::NONE)
                        .await
                        .unwrap()
                }
                _ => {
                    let data = pattern(1000 + round, BLOCK_BYTES);
                    model[lba as usize] = Some(data.clone());
                    store
                        .enqueue_write(vol.id, lba * BLOCK_BYTES_U64, Bytes::from(data), false, Tag::NONE)
                        .await
                        .unwrap()
                }
            };
            // Queued right behind the write, usually before it is applied: the answer must
            // include it (from the pending map), as it includes everything queued earlier.
            let crcs =
                store.enqueue_block_crcs(vol.id, 0, n_blocks * BLOCK_BYTES_U64).await.unwrap().wait().await.unwrap();
            let want: Vec<Option<u32>> = model.iter().map(|b| b.as_deref().map(block_crc)).collect();
            assert_eq!(crcs, want, "round {round}");
            pending.wait().await.unwrap();
        }
        // A sub-range, answered without reading data: with every read failing, it still works.
        store.flush().await.unwrap();
        disk.lock().unwrap().fail_reads_in = Some((0, u64::MAX));
        let want: Vec<Option<u32>> = model[8..24].iter().map(|b| b.as_deref().map(block_crc)).collect();
        assert_eq!(store.block_crcs(vol.id, 8 * BLOCK_BYTES_U64, 16 * BLOCK_BYTES_U64).await.unwrap(), want);
        let mapped = model.iter().position(Option::is_some).unwrap() as u64;
        assert!(store.read(vol.id, mapped * BLOCK_BYTES_U64, BLOCK_BYTES_U64).await.is_err(), "reads do fail");
        disk.lock().unwrap().fail_reads_in = None;
        // Unaligned, out-of-range and oversized requests are refused.
        assert!(store.block_crcs(vol.id, 512, BLOCK_BYTES_U64).await.is_err());
        assert!(store.block_crcs(vol.id, 0, BLOCK_BYTES_U64 + 512).await.is_err());
        assert!(store.block_crcs(vol.id, (n_blocks - 1) * BLOCK_BYTES_U64, 2 * BLOCK_BYTES_U64).await.is_err());
        let big = store.create_volume("big", 2 * syncblock_engine::CRC_BLOCKS_MAX * BLOCK_BYTES_U64).await.unwrap();
        assert!(store.block_crcs(big.id, 0, (syncblock_engine::CRC_BLOCKS_MAX + 1) * BLOCK_BYTES_U64).await.is_err());
        assert_eq!(
            store.block_crcs(big.id, 0, syncblock_engine::CRC_BLOCKS_MAX * BLOCK_BYTES_U64).await.unwrap().len() as u64,
            syncblock_engine::CRC_BLOCKS_MAX
        );
    });
}

/// A resync's writes and trims stay out of the volume's committed image until the commit: a crash
/// before it recovers the image as it was (the staged blocks are dropped), reads meanwhile see the
/// newest data, and the cleaner moving staged blocks does not lose them.
/// A resync's writes under `tag`: blocks 0..8 rewritten (block `lba` with `pattern(seed + lba)`),
/// 8..12 trimmed.
async fn stage_resync(store: &Store, vol: VolumeId, seed: u64, tag: Tag) {
    for lba in 0..8 {
        tagged_write(store, vol, lba, seed + lba, tag).await;
    }
    tagged_trim(store, vol, 8, 4, tag).await;
}

#[test]
fn a_resync_is_invisible_to_recovery_until_it_commits_and_survives_cleaning() {
    use syncblock_engine::StagedOp;
    let rt = rt();
    let (disk, store, vol) = sim_volume(&rt, 24 << 20, 2 << 20);
    rt.block_on(store.set_repl(vol.id, 0, 0, Vec::new())).unwrap();
    rt.block_on(async {
        for lba in 0..16 {
            tagged_write(&store, vol.id, lba, lba, Tag::seq(lba + 1)).await;
        }
        stage_resync(&store, vol.id, 100, Tag::resync(50)).await;
        store.flush().await.unwrap();
    });
    // Reads see the newest (staged) data.
    assert_eq!(&read_block(&rt, &store, vol.id, 0)[..], &pattern(100, BLOCK_BYTES)[..]);
    assert!(read_block(&rt, &store, vol.id, 8).iter().all(|b| *b == 0));
    assert_eq!(rt.block_on(store.volume_info(vol.id)).unwrap().staged_blocks, 8);
    // A checkpoint carries the staged blocks; a crash before the commit drops them.
    rt.block_on(store.checkpoint()).unwrap();
    let (store2, disk2) = crash_and_reopen(store, &disk);
    for lba in 0..16 {
        let got = read_block(&rt, &store2, vol.id, lba);
        assert_eq!(&got[..], &pattern(lba, BLOCK_BYTES)[..], "uncommitted resync visible at lba {lba} after a crash");
    }
    assert_eq!(rt.block_on(store2.volume_info(vol.id)).unwrap().staged_blocks, 0);

    // Again, and this time the cleaner runs in between (rewriting 16..512 many times), then commit.
    rt.block_on(async {
        stage_resync(&store2, vol.id, 200, Tag::resync(60)).await;
        let mut tag = 100;
        for round in 0..14u64 {
            for lba in 16..512 {
                tag += 1;
                tagged_write(&store2, vol.id, lba, round * 1000 + lba, Tag::resync(tag)).await;
            }
            store2.checkpoint().await.unwrap();
        }
    });
    let info = rt.block_on(store2.volume_info(vol.id)).unwrap();
    assert!(!info.resync_overflowed);
    let stats = rt.block_on(store2.stats()).unwrap();
    assert!(stats.segments_cleaned + stats.gc_blocks_copied > 0 || stats.log_blocks_written > 6144, "{stats:?}");
    rt.block_on(store2.set_repl_staged(vol.id, 70, 0, Vec::new(), StagedOp::Commit)).unwrap();
    let (store3, _disk3) = crash_and_reopen(store2, &disk2);
    for lba in 0..8 {
        let got = read_block(&rt, &store3, vol.id, lba);
        assert_eq!(&got[..], &pattern(200 + lba, BLOCK_BYTES)[..], "committed resync lost at lba {lba}");
    }
    for lba in 8..12 {
        assert!(read_block(&rt, &store3, vol.id, lba).iter().all(|b| *b == 0));
    }
    for lba in 12..16 {
        assert_eq!(&read_block(&rt, &store3, vol.id, lba)[..], &pattern(lba, BLOCK_BYTES)[..]);
    }
    assert_eq!(&read_block(&rt, &store3, vol.id, 511)[..], &pattern(13_000 + 511, BLOCK_BYTES)[..]);
    let info = rt.block_on(store3.volume_info(vol.id)).unwrap();
    assert_eq!((info.last_tag, info.staged_blocks), (70, 0));
}
