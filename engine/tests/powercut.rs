//! Power-cut tests: run a workload on the simulated device (which logs every write and sync), then
//! for every I/O boundary build the image a power cut at that instant could leave — synced writes
//! present, later writes each lost, kept or torn sector by sector — recover it and check the
//! recovery rule: every write acknowledged as durable (FUA, or completed before an acknowledged
//! flush) is present, and every 4 KiB block holds exactly one version that was written to it,
//! never an older version than the newest durable one. The workload fills the small store so the
//! cleaner and checkpoints run, and crashes land inside them too.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::*;
use syncblock_engine::sim::{apply_unsynced, LoggedOp, Rng, SimDevice, SimDisk, Unsynced};
use syncblock_engine::{Config, Store, VolumeId};

const VOL_BLOCKS: u64 = 96;
const N_VOLS: usize = 2;

struct Version {
    data: Vec<u8>,
    /// Op count of the disk log when the write became durable (acknowledged FUA or covered by an
    /// acknowledged flush); a crash at any boundary at or after it must keep this version or a
    /// newer one.
    durable_from: Option<usize>,
}

#[derive(Default)]
struct Model {
    /// Versions of each (volume, lba), oldest first.
    blocks: BTreeMap<(usize, u64), Vec<Version>>,
    /// Acknowledged writes not yet known durable.
    acked: Vec<((usize, u64), usize)>,
    /// Op count at which each volume's creation was acknowledged (durable).
    created_at: Vec<usize>,
}

impl Model {
    fn add(&mut self, key: (usize, u64), data: Vec<u8>, durable_at: Option<usize>) {
        let versions = self.blocks.entry(key).or_default();
        versions.push(Version { data, durable_from: durable_at });
        if durable_at.is_none() {
            self.acked.push((key, versions.len() - 1));
        }
    }

    fn flushed(&mut self, at: usize) {
        for (key, idx) in self.acked.drain(..) {
            let v = &mut self.blocks.get_mut(&key).unwrap()[idx];
            v.durable_from.get_or_insert(at);
        }
    }
}

fn n_ops(disk: &Arc<Mutex<SimDisk>>) -> usize {
    disk.lock().unwrap().n_ops()
}

/// Runs the workload and returns the disk (with its log) and the model.
fn workload(seed: u64) -> (Arc<Mutex<SimDisk>>, Model, syncblock_engine::Stats) {
    let rt = rt();
    let disk = sim_disk(3 << 20, 64 << 10);
    let cfg = Config { checkpoint_interval_bytes: 192 << 10, ..Config::default() };
    // Completions in a seeded random order: syncs and writes submitted together may run either way.
    let store = Store::open_device(Box::new(SimDevice::new(disk.clone()).with_reordering(seed)), cfg, "sim").unwrap();
    let mut model = Model::default();
    let mut vols = Vec::new();
    for i in 0..N_VOLS {
        vols.push(rt.block_on(store.create_volume(&format!("v{i}"), VOL_BLOCKS * 4096)).unwrap().id);
        model.created_at.push(n_ops(&disk));
    }
    let mut rng = Rng::new(seed);
    let mut tag = 0u64;
    let mut write = |model: &mut Model, rt: &tokio::runtime::Runtime, vol: usize, lba: u64, n: u64, fua: bool| {
        tag += 1;
        let data = pattern(tag, (n * 4096) as usize);
        let bytes = Bytes::from(data.clone());
        if !fua && tag % 2 == 0 {
            // Write-back: answered once queued, possibly before the device saw any of it.
            rt.block_on(store.write_back(vols[vol], lba * 4096, bytes)).unwrap();
        } else {
            rt.block_on(store.write(vols[vol], lba * 4096, bytes, fua)).unwrap();
        }
        let at = fua.then(|| n_ops(&disk));
        for i in 0..n {
            model.add((vol, lba + i), data[(i * 4096) as usize..((i + 1) * 4096) as usize].to_vec(), at);
        }
    };
    // Fill, so that later overwrites leave segments partly dead and the cleaner must copy.
    for vol in 0..N_VOLS {
        for lba in (0..VOL_BLOCKS).step_by(8) {
            write(&mut model, &rt, vol, lba, 8, false);
        }
    }
    rt.block_on(store.flush()).unwrap();
    model.flushed(n_ops(&disk));
    for step in 0..260u64 {
        let vol = rng.below(N_VOLS as u64) as usize;
        let lba = rng.below(VOL_BLOCKS);
        match rng.below(20) {
            0 => {
                rt.block_on(store.flush()).unwrap();
                model.flushed(n_ops(&disk));
            }
            1 => {
                let n = (1 + rng.below(4)).min(VOL_BLOCKS - lba);
                rt.block_on(store.trim(vols[vol], lba * 4096, n * 4096)).unwrap();
                for i in 0..n {
                    model.add((vol, lba + i), vec![0; 4096], None);
                }
            }
            2 => {
                let n = (1 + rng.below(3)).min(VOL_BLOCKS - lba);
                let may_trim = rng.below(2) == 0;
                rt.block_on(store.write_zeroes(vols[vol], lba * 4096, n * 4096, may_trim, false)).unwrap();
                for i in 0..n {
                    model.add((vol, lba + i), vec![0; 4096], None);
                }
            }
            3 if step % 50 == 3 => rt.block_on(store.checkpoint()).unwrap(),
            4 | 5 => {
                // A database's commit: one write, then a flush. Repeated, the engine writes such
                // batches durably (FUA) and answers the flush without a sync.
                let n = (1 + rng.below(2)).min(VOL_BLOCKS - lba);
                write(&mut model, &rt, vol, lba, n, false);
                rt.block_on(store.flush()).unwrap();
                model.flushed(n_ops(&disk));
            }
            _ => {
                let n = (1 + rng.below(4)).min(VOL_BLOCKS - lba);
                write(&mut model, &rt, vol, lba, n, rng.below(8) == 0);
            }
        }
    }
    let stats = rt.block_on(store.stats()).unwrap();
    // Stop the engine without a clean shutdown: the log as it stands is what we crash into.
    disk.lock().unwrap().fail_writes_from = Some(0);
    disk.lock().unwrap().fail_syncs_from = Some(0);
    drop(store);
    (disk, model, stats)
}

/// Images after each prefix of the log: (boundary, image).
fn check_boundary(disk: &SimDisk, model: &Model, k: usize, image: Vec<u8>, rt: &tokio::runtime::Runtime) {
    let crashed = SimDisk::new(image);
    let store = match Store::open_device(Box::new(SimDevice::new(crashed.clone())), Config::default(), "crashed") {
        Ok(s) => s,
        Err(e) => panic!("crash at boundary {k} of {}: recovery failed: {e}", disk.n_ops()),
    };
    let vols = rt.block_on(store.list_volumes()).unwrap();
    for (vi, created) in model.created_at.iter().enumerate() {
        let found = vols.iter().find(|v| v.name == format!("v{vi}"));
        let Some(vol) = found else {
            assert!(k < *created, "boundary {k}: volume v{vi}, created durably at {created}, is missing");
            continue;
        };
        let id: VolumeId = vol.id;
        let all = rt.block_on(store.read(id, 0, VOL_BLOCKS * 4096)).unwrap();
        for lba in 0..VOL_BLOCKS {
            let got = &all[(lba * 4096) as usize..((lba + 1) * 4096) as usize];
            let versions = model.blocks.get(&(vi, lba));
            let empty = Vec::new();
            let versions = versions.unwrap_or(&empty);
            let newest_durable = versions.iter().rposition(|v| v.durable_from.is_some_and(|d| d <= k));
            let ok = match newest_durable {
                Some(d) => versions[d..].iter().any(|v| v.data == got),
                None => got.iter().all(|b| *b == 0) || versions.iter().any(|v| v.data == got),
            };
            if !ok {
                let which = versions.iter().position(|v| v.data == got);
                panic!(
                    "boundary {k}/{}: v{vi} lba {lba} holds {} but the newest durable version is #{newest_durable:?} of {}",
                    disk.n_ops(),
                    match which { Some(i) => format!("version #{i}"), None if got.iter().all(|b| *b == 0) => "zeros".into(), None => "garbage".into() },
                    versions.len()
                );
            }
        }
    }
    drop(store);
}

fn crash_everywhere(seed: u64) {
    let (disk, model, stats) = workload(seed);
    assert!(stats.gc_blocks_copied > 0 && stats.segments_cleaned > 0, "workload must exercise the cleaner: {stats:?}");
    assert!(stats.checkpoints >= 3, "workload must exercise checkpoints: {stats:?}");
    assert!(stats.durable_writes >= 5, "workload must exercise durable (FUA) log writes: {stats:?}");
    let disk = disk.lock().unwrap();
    let rt = rt();
    // Walk the log once, keeping the durable image incrementally.
    let mut durable = disk.base.clone();
    let mut unsynced: Vec<Unsynced<'_>> = Vec::new();
    let n = disk.n_ops();
    for k in 0..=n {
        let mut image = durable.clone();
        let mut rng = Rng::new(seed ^ (k as u64).wrapping_mul(0x2545_f491_4f6c_dd1d));
        apply_unsynced(&mut image, &unsynced, &mut rng);
        check_boundary(&disk, &model, k, image, &rt);
        if k == n {
            break;
        }
        match &disk.log[k] {
            LoggedOp::Write { offset, data, durable: fua } => {
                unsynced.push(Unsynced { offset: *offset, data, durable: *fua })
            }
            LoggedOp::Sync => {
                for w in unsynced.drain(..) {
                    durable[w.offset as usize..w.offset as usize + w.data.len()].copy_from_slice(w.data);
                }
            }
        }
    }
    eprintln!(
        "checked {} crash points ({} cleaned segments, {} checkpoints in the workload)",
        n + 1,
        stats.segments_cleaned,
        stats.checkpoints
    );
}

#[test]
fn recovery_keeps_every_durable_write_at_every_crash_point() {
    crash_everywhere(1);
}

#[test]
fn recovery_keeps_every_durable_write_at_every_crash_point_second_seed() {
    crash_everywhere(2);
}
