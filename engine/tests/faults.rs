//! Fault tests: corruption of data blocks, record headers, superblocks and checkpoints; failed
//! writes and syncs; a full store; and the volume table and changed-block API across reopen.

mod common;

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::*;
use syncblock_engine::format::{RecordHeader, SegmentHeader, Superblock};
use syncblock_engine::sim::SimDisk;
use syncblock_engine::{Config, Error, Lsn, Since, Store, BLOCK_BYTES};

/// Every record in a store image: (device offset of its header, header).
fn records(image: &[u8]) -> Vec<(usize, RecordHeader)> {
    let sb = Superblock::decode(&image[..BLOCK_BYTES]).unwrap();
    let mut out = Vec::new();
    for seg in 0..sb.n_segments {
        let base = sb.segment_offset(seg) as usize;
        let Ok(sh) = SegmentHeader::decode(&image[base..base + BLOCK_BYTES], sb.store_id) else { continue };
        let mut cursor = 1usize;
        while cursor < sb.segment_blocks as usize {
            let at = base + cursor * BLOCK_BYTES;
            let Ok(rec) =
                RecordHeader::decode(&image[at..base + sb.segment_blocks as usize * BLOCK_BYTES], sb.store_id)
            else {
                break;
            };
            if rec.segment_seq != sh.seq {
                break;
            }
            cursor += (rec.header_blocks() + rec.data_blocks()) as usize;
            out.push((at, rec));
        }
    }
    out.sort_by_key(|(_, r)| r.lsn);
    out
}

/// Three flushed writes of 4 blocks each to LBAs 0, 8, 16 after the volume's creation checkpoint.
fn three_flushed_writes() -> (Vec<u8>, Vec<Vec<u8>>) {
    let rt = rt();
    let (disk, store, vol) = sim_volume(&rt, 16 << 20, 1 << 20);
    rt.block_on(store.checkpoint()).unwrap();
    let mut datas = Vec::new();
    for i in 0..3u64 {
        let data = pattern(i + 1, 4 * BLOCK_BYTES);
        rt.block_on(store.write(vol.id, i * 8 * BLOCK_BYTES as u64, Bytes::from(data.clone()), false)).unwrap();
        rt.block_on(store.flush()).unwrap();
        datas.push(data);
    }
    (crash(store, &disk), datas)
}

fn read_all(store: &Store, n: u64) -> Vec<u8> {
    let rt = rt();
    let vol = rt.block_on(store.volume("v")).unwrap();
    rt.block_on(store.read(vol.id, 0, n)).unwrap().to_vec()
}

#[test]
fn recovery_replays_flushed_log_after_crash() {
    let (image, datas) = three_flushed_writes();
    let (_d, store) = open_image(image);
    let store = store.unwrap();
    let all = read_all(&store, 24 * BLOCK_BYTES as u64);
    for (i, d) in datas.iter().enumerate() {
        assert_eq!(&all[i * 8 * BLOCK_BYTES..i * 8 * BLOCK_BYTES + 4 * BLOCK_BYTES], &d[..]);
    }
    assert_eq!(store.recovery_report().records_replayed, 3);
}

#[test]
fn recovery_refuses_corrupt_header_of_a_durable_record() {
    let (mut image, _) = three_flushed_writes();
    let recs = records(&image);
    // The second write's record: later records carry a durable LSN covering it.
    let (at, rec) = recs.iter().find(|(_, r)| r.entries.iter().any(|e| e.lba.0 == 8)).unwrap();
    image[at + 100] ^= 0x40;
    let (_d, r) = open_image(image);
    match r {
        Err(Error::CorruptRecord { lsn, .. }) => assert_eq!(lsn, rec.lsn),
        other => panic!("expected CorruptRecord, got {other:?}"),
    }
}

#[test]
fn recovery_refuses_corrupt_data_block_of_a_durable_record() {
    let (mut image, _) = three_flushed_writes();
    let recs = records(&image);
    let (at, rec) = recs.iter().find(|(_, r)| r.entries.iter().any(|e| e.lba.0 == 8)).unwrap();
    let data_at = at + rec.header_blocks() as usize * BLOCK_BYTES;
    image[data_at + 2 * BLOCK_BYTES + 17] ^= 1;
    let (_d, r) = open_image(image);
    let e = r.unwrap_err();
    assert!(matches!(&e, Error::CorruptRecord { lsn, .. } if *lsn == rec.lsn), "{e}");
    assert!(e.to_string().contains("segment"), "{e}");
}

#[test]
fn recovery_discards_torn_tail_after_last_flush() {
    let rt = rt();
    let (disk, store, vol) = sim_volume(&rt, 16 << 20, 1 << 20);
    let a = pattern(1, 4 * BLOCK_BYTES);
    rt.block_on(store.write(vol.id, 0, Bytes::from(a.clone()), true)).unwrap();
    // Not flushed: may be lost, and here it is torn.
    rt.block_on(store.write(vol.id, 8 * BLOCK_BYTES as u64, Bytes::from(pattern(2, 4 * BLOCK_BYTES)), false)).unwrap();
    let mut image = crash(store, &disk);
    let recs = records(&image);
    let (at, rec) = recs.last().unwrap();
    image[at + rec.header_blocks() as usize * BLOCK_BYTES + 3 * BLOCK_BYTES + 5] ^= 0xff;
    let (_d, store) = open_image(image);
    let store = store.unwrap();
    assert!(store.recovery_report().discarded_torn.is_some(), "{:?}", store.recovery_report());
    let all = read_all(&store, 12 * BLOCK_BYTES as u64);
    assert_eq!(&all[..4 * BLOCK_BYTES], &a[..]);
    assert!(all[8 * BLOCK_BYTES..].iter().all(|b| *b == 0), "the torn record is discarded whole");
}

#[test]
fn corrupt_data_block_in_checkpointed_segment_is_reported_on_read() {
    let rt = rt();
    let (disk, store, vol) = sim_volume(&rt, 16 << 20, 1 << 20);
    rt.block_on(store.write(vol.id, 0, Bytes::from(pattern(5, 8 * BLOCK_BYTES)), false)).unwrap();
    store.close().unwrap();
    let mut image = disk.lock().unwrap().written.clone();
    let recs = records(&image);
    let (at, rec) = recs.iter().find(|(_, r)| !r.crcs.is_empty()).unwrap();
    image[at + (rec.header_blocks() as usize + 3) * BLOCK_BYTES + 99] ^= 4;
    let (_d, store) = open_image(image);
    let store = store.unwrap();
    let e = rt.block_on(store.read(vol.id, 3 * BLOCK_BYTES as u64, 10)).unwrap_err();
    assert!(matches!(e, Error::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("segment"), "{e}");
    // Neighbouring blocks are fine.
    assert_eq!(
        &rt.block_on(store.read(vol.id, 0, 3 * BLOCK_BYTES as u64)).unwrap()[..],
        &pattern(5, 8 * BLOCK_BYTES)[..3 * BLOCK_BYTES]
    );
}

#[test]
fn damaged_superblock_copy_falls_back_and_both_damaged_is_not_a_store() {
    let (mut image, datas) = three_flushed_writes();
    image[20] ^= 1;
    let (_d, store) = open_image(image.clone());
    let store = store.unwrap();
    assert_eq!(&read_all(&store, 4 * BLOCK_BYTES as u64)[..], &datas[0][..]);
    drop(store);
    image[BLOCK_BYTES + 20] ^= 1;
    let (_d, r) = open_image(image);
    assert!(matches!(r, Err(Error::NotAStore { .. })), "{r:?}");
}

#[test]
fn damaged_newest_checkpoint_falls_back_to_the_older_one() {
    let (image, datas) = three_flushed_writes();
    // Open and close once more: writes a newer checkpoint after the replay.
    let (disk, store) = open_image(image);
    store.unwrap().close().unwrap();
    let mut image = disk.lock().unwrap().written.clone();
    let sb = Superblock::decode(&image[..BLOCK_BYTES]).unwrap();
    // Find the slot with the higher seq and damage its payload.
    let seqs: Vec<u64> = (0..2)
        .map(|s| {
            let o = sb.checkpoint_offsets[s] as usize;
            syncblock_engine::format::CheckpointHeader::decode(&image[o..o + BLOCK_BYTES], sb.store_id)
                .map(|h| h.seq)
                .unwrap_or(0)
        })
        .collect();
    let newest = if seqs[0] > seqs[1] { 0 } else { 1 };
    let o = sb.checkpoint_offsets[newest] as usize;
    image[o + BLOCK_BYTES + 40] ^= 0x10;
    let (_d, store) = open_image(image);
    let store = store.unwrap();
    assert!(store.recovery_report().checkpoint_fallback.is_some());
    let all = read_all(&store, 24 * BLOCK_BYTES as u64);
    for (i, d) in datas.iter().enumerate() {
        assert_eq!(&all[i * 8 * BLOCK_BYTES..i * 8 * BLOCK_BYTES + 4 * BLOCK_BYTES], &d[..]);
    }
}

/// `store`'s device image, reopened once the store is dropped, holds `block` (block 0): what was
/// durable before the failure is still there.
fn reopened_holds(store: Store, disk: &Arc<Mutex<SimDisk>>, block: &[u8]) {
    let image = disk.lock().unwrap().written.clone();
    drop(store);
    let (_d, store) = open_image(image);
    let store = store.unwrap();
    assert_eq!(&read_all(&store, BLOCK_BYTES as u64)[..], block);
}

/// A store with one durable block (block 0, returned) on a device whose writes fail from now on.
fn one_durable_block_then_failing_writes(
    rt: &tokio::runtime::Runtime,
) -> (Arc<Mutex<SimDisk>>, Store, syncblock_engine::VolumeInfo, Vec<u8>) {
    let (disk, store, vol) = sim_volume(rt, 16 << 20, 1 << 20);
    let a = pattern(1, BLOCK_BYTES);
    rt.block_on(store.write(vol.id, 0, Bytes::from(a.clone()), true)).unwrap();
    let n = disk.lock().unwrap().n_writes;
    disk.lock().unwrap().fail_writes_from = Some(n);
    (disk, store, vol, a)
}

#[test]
fn failed_write_poisons_the_store_and_reopen_recovers() {
    let rt = rt();
    let (disk, store, vol, a) = one_durable_block_then_failing_writes(&rt);
    let e =
        rt.block_on(store.write(vol.id, BLOCK_BYTES as u64, Bytes::from(pattern(2, BLOCK_BYTES)), false)).unwrap_err();
    assert!(matches!(e, Error::Poisoned { .. }), "{e}");
    disk.lock().unwrap().fail_writes_from = None;
    // Even with the device healthy again, the store refuses writes and flushes until reopened.
    let e = rt
        .block_on(store.write(vol.id, 2 * BLOCK_BYTES as u64, Bytes::from(pattern(3, BLOCK_BYTES)), false))
        .unwrap_err();
    assert!(matches!(e, Error::Poisoned { .. }), "{e}");
    assert!(e.to_string().contains("reopen"), "{e}");
    assert!(matches!(rt.block_on(store.flush()), Err(Error::Poisoned { .. })));
    // Reads of acknowledged data still work.
    assert_eq!(&rt.block_on(store.read(vol.id, 0, BLOCK_BYTES as u64)).unwrap()[..], &a[..]);
    reopened_holds(store, &disk, &a);
}

#[test]
fn a_failed_log_write_behind_a_write_back_answer_fails_the_next_flush() {
    let rt = rt();
    let (disk, store, vol, a) = one_durable_block_then_failing_writes(&rt);
    // Answered once queued: the failure is not known yet.
    rt.block_on(store.write_back(vol.id, BLOCK_BYTES as u64, Bytes::from(pattern(2, BLOCK_BYTES)))).unwrap();
    // The flush that would make it durable reports the failure instead of success.
    let e = rt.block_on(store.flush()).unwrap_err();
    assert!(matches!(e, Error::Poisoned { .. }), "{e}");
    disk.lock().unwrap().fail_writes_from = None;
    assert!(matches!(
        rt.block_on(store.write_back(vol.id, 0, Bytes::from(pattern(3, BLOCK_BYTES)))),
        Err(Error::Poisoned { .. })
    ));
    // What was durable before is still there after a reopen.
    reopened_holds(store, &disk, &a);
}

#[test]
fn failed_sync_fails_the_flush_and_poisons() {
    let rt = rt();
    let (disk, store, vol) = sim_volume(&rt, 16 << 20, 1 << 20);
    rt.block_on(store.write(vol.id, 0, Bytes::from(pattern(1, BLOCK_BYTES)), false)).unwrap();
    let n = disk.lock().unwrap().n_syncs;
    disk.lock().unwrap().fail_syncs_from = Some(n);
    assert!(matches!(rt.block_on(store.flush()), Err(Error::Poisoned { .. })));
    disk.lock().unwrap().fail_syncs_from = None;
    assert!(matches!(rt.block_on(store.flush()), Err(Error::Poisoned { .. })), "no retried fsync");
    let e = rt.block_on(store.write(vol.id, 0, Bytes::from(pattern(2, BLOCK_BYTES)), true)).unwrap_err();
    assert!(matches!(e, Error::Poisoned { .. }), "{e}");
}

#[test]
fn full_store_refuses_writes_then_accepts_them_after_trim() {
    let rt = rt();
    let disk = sim_disk(4 << 20, 64 << 10);
    let store = open_sim(&disk, Config::default()).unwrap();
    // A thin volume far larger than the store.
    let vol = rt.block_on(store.create_volume("v", 64 << 20)).unwrap();
    let chunk = 16 * BLOCK_BYTES;
    let mut written = 0u64;
    let err = loop {
        let data = pattern(written, chunk);
        match rt.block_on(store.write(vol.id, written, Bytes::from(data), false)) {
            Ok(()) => written += chunk as u64,
            Err(e) => break e,
        }
        assert!(written < 64 << 20, "never ran out of space");
    };
    assert!(matches!(err, Error::NoSpace), "{err}");
    assert!(err.to_string().contains("space"), "{err}");
    assert!(written > 1 << 20, "only {written} bytes fit");
    // Nothing acknowledged was lost.
    for off in (0..written).step_by(chunk) {
        let got = rt.block_on(store.read(vol.id, off, chunk as u64)).unwrap();
        assert!(got[..] == pattern(off, chunk)[..], "data at {off} lost when the store filled up");
    }
    // Free half, then writing works again (the cleaner reclaims the trimmed space).
    rt.block_on(store.trim(vol.id, 0, written / 2)).unwrap();
    for i in 0..8u64 {
        let off = written + i * chunk as u64;
        rt.block_on(store.write(vol.id, off, Bytes::from(pattern(off, chunk)), false)).unwrap();
    }
    rt.block_on(store.flush()).unwrap();
    store.close().unwrap();
    let store = open_sim(&disk, Config::default()).unwrap();
    let got = rt.block_on(store.read(vol.id, written, chunk as u64)).unwrap();
    assert!(got[..] == pattern(written, chunk)[..]);
}

#[test]
fn volume_table_changes_persist() {
    let rt = rt();
    let disk = sim_disk(16 << 20, 1 << 20);
    let store = open_sim(&disk, Config::default()).unwrap();
    let a = rt.block_on(store.create_volume("a", 1 << 20)).unwrap();
    let b = rt.block_on(store.create_volume("b", 1 << 20)).unwrap();
    assert!(matches!(rt.block_on(store.create_volume("bad name!", 4096)), Err(Error::BadVolumeName(_))));
    assert!(matches!(rt.block_on(store.create_volume("odd", 1000)), Err(Error::InvalidArgument(_))));
    rt.block_on(store.write(a.id, 0, Bytes::from(pattern(1, 2 * BLOCK_BYTES)), false)).unwrap();
    rt.block_on(store.write(a.id, 200 * BLOCK_BYTES as u64, Bytes::from(pattern(2, BLOCK_BYTES)), false)).unwrap();
    rt.block_on(store.resize_volume(a.id, 100 * BLOCK_BYTES as u64)).unwrap();
    rt.block_on(store.resize_volume(a.id, 300 * BLOCK_BYTES as u64)).unwrap();
    rt.block_on(store.delete_volume(b.id)).unwrap();
    let c = rt.block_on(store.create_volume("c", 8192)).unwrap();
    assert_ne!(c.id, b.id, "volume ids are never reused");
    let image = crash(store, &disk);
    let (_d, store) = open_image(image);
    let store = store.unwrap();
    let vols = rt.block_on(store.list_volumes()).unwrap();
    let names: Vec<_> = vols.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["a", "c"]);
    assert_eq!(vols[0].size_bytes, 300 * BLOCK_BYTES as u64);
    assert_eq!(
        &rt.block_on(store.read(a.id, 0, 2 * BLOCK_BYTES as u64)).unwrap()[..],
        &pattern(1, 2 * BLOCK_BYTES)[..]
    );
    // The block beyond the shrink point was dropped: the regrown area reads as zeros.
    assert!(rt
        .block_on(store.read(a.id, 200 * BLOCK_BYTES as u64, BLOCK_BYTES as u64))
        .unwrap()
        .iter()
        .all(|b| *b == 0));
}

#[test]
fn changed_since_lists_live_blocks_written_after_an_lsn() {
    let rt = rt();
    let (_disk, store, vol) = sim_volume(&rt, 16 << 20, 1 << 20);
    rt.block_on(store.write(vol.id, 0, Bytes::from(pattern(1, 8 * BLOCK_BYTES)), false)).unwrap();
    rt.block_on(store.flush()).unwrap();
    let mark = rt.block_on(store.durable_lsn()).unwrap();
    rt.block_on(store.write(vol.id, 2 * BLOCK_BYTES as u64, Bytes::from(pattern(2, 2 * BLOCK_BYTES)), false)).unwrap();
    rt.block_on(store.write(vol.id, 100 * BLOCK_BYTES as u64, Bytes::from(pattern(3, BLOCK_BYTES)), false)).unwrap();
    rt.block_on(store.flush()).unwrap();
    let runs = rt.block_on(store.changed_since(vol.id, Since::Lsn(mark))).unwrap();
    let got: Vec<(u64, u64)> = runs.iter().map(|r| (r.lba.0, r.n_blocks)).collect();
    assert_eq!(got, [(2, 2), (100, 1)]);
    let all = rt.block_on(store.changed_since(vol.id, Since::Lsn(Lsn(0)))).unwrap();
    let got: Vec<(u64, u64)> = all.iter().map(|r| (r.lba.0, r.n_blocks)).collect();
    assert_eq!(got, [(0, 8), (100, 1)]);
}
