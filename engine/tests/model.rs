//! Property test: random write / trim / zero / flush / read / checkpoint / reopen sequences over
//! several volumes, on a small simulated disk with tiny segments (so the cleaner and checkpoints
//! run constantly) and a device that completes I/O in random order, checked against a byte model.

mod common;

use bytes::Bytes;
use common::*;
use proptest::prelude::*;
use syncblock_engine::sim::SimDevice;
use syncblock_engine::{BlockRun, Config, Lba, Store, Tag, VolumeId};

const VOL_BYTES: u64 = 384 * 1024;
const N_VOLS: usize = 3;

#[derive(Debug, Clone)]
enum Op {
    /// `write_back`: through [`Store::write_back`] (answered once queued) when not `fua`.
    Write {
        vol: usize,
        offset: u64,
        len: u64,
        seed: u64,
        fua: bool,
        write_back: bool,
    },
    Trim {
        vol: usize,
        offset: u64,
        len: u64,
    },
    Zero {
        vol: usize,
        offset: u64,
        len: u64,
        may_trim: bool,
    },
    Flush,
    Read {
        vol: usize,
        offset: u64,
        len: u64,
    },
    /// Where the blocks of two runs lie (`block_places`), then a read of all their blocks in log
    /// order (`enqueue_read_blocks`): what a replica's copy does.
    ReadPlaced {
        vol: usize,
        runs: [(u64, u64); 2],
    },
    /// Whole blocks at scattered LBAs in one request (`enqueue_write_blocks`), in the order
    /// given (an LBA named twice ends with its last data).
    WriteScattered {
        vol: usize,
        lbas: Vec<u64>,
        seed: u64,
    },
    Checkpoint,
    Reopen,
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        // Block-aligned.
        (0..VOL_BYTES / 4096, 1..16u64).prop_map(|(b, n)| (b * 4096, n * 4096)),
        // Arbitrary bytes.
        (0..VOL_BYTES, 1..20_000u64),
    ]
    .prop_map(|(o, l)| (o, l.min(VOL_BYTES - o).max(1)))
    .prop_filter("in range", |(o, l)| o + l <= VOL_BYTES)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (0..N_VOLS, range(), any::<u64>(), prop::bool::weighted(0.1), any::<bool>())
            .prop_map(|(vol, (offset, len), seed, fua, write_back)| Op::Write { vol, offset, len, seed, fua, write_back }),
        2 => (0..N_VOLS, range()).prop_map(|(vol, (offset, len))| Op::Trim { vol, offset, len }),
        2 => (0..N_VOLS, range(), any::<bool>()).prop_map(|(vol, (offset, len), may_trim)| Op::Zero { vol, offset, len, may_trim }),
        2 => Just(Op::Flush),
        5 => (0..N_VOLS, range()).prop_map(|(vol, (offset, len))| Op::Read { vol, offset, len }),
        2 => (0..N_VOLS, [(0..VOL_BYTES / 4096, 1..40u64), (0..VOL_BYTES / 4096, 1..40u64)])
            .prop_map(|(vol, runs)| Op::ReadPlaced { vol, runs }),
        2 => (0..N_VOLS, proptest::collection::vec(0..VOL_BYTES / 4096, 1..24), any::<u64>())
            .prop_map(|(vol, lbas, seed)| Op::WriteScattered { vol, lbas, seed }),
        1 => Just(Op::Checkpoint),
        1 => Just(Op::Reopen),
    ]
}

fn open(disk: &std::sync::Arc<std::sync::Mutex<syncblock_engine::sim::SimDisk>>, seed: u64) -> Store {
    let cfg = Config { checkpoint_interval_bytes: 256 * 1024, ..Config::default() };
    Store::open_device(Box::new(SimDevice::new(disk.clone()).with_reordering(seed)), cfg, "sim").unwrap()
}

fn run(ops: Vec<Op>, seed: u64, disk_bytes: usize) -> syncblock_engine::Stats {
    let rt = rt();
    // 64 KiB segments on a 4 MiB disk: ~50 segments for 1.1 MiB of volumes, so the cleaner runs.
    let disk = sim_disk(disk_bytes, 64 << 10);
    let mut store = open(&disk, seed);
    let mut vols: Vec<VolumeId> = Vec::new();
    for i in 0..N_VOLS {
        vols.push(rt.block_on(store.create_volume(&format!("v{i}"), VOL_BYTES)).unwrap().id);
    }
    let mut model: Vec<Vec<u8>> = vec![vec![0u8; VOL_BYTES as usize]; N_VOLS];
    // Cleaner activity summed over every store instance (stats restart at each open).
    let (mut cleaned, mut copied) = (0, 0);
    for (step, op) in ops.into_iter().enumerate() {
        match op {
            Op::Write { vol, offset, len, seed, fua, write_back } => {
                let data = Bytes::from(pattern(seed, len as usize));
                if write_back && !fua {
                    rt.block_on(store.write_back(vols[vol], offset, data.clone())).unwrap();
                } else {
                    rt.block_on(store.write(vols[vol], offset, data.clone(), fua)).unwrap();
                }
                model[vol][offset as usize..(offset + len) as usize].copy_from_slice(&data);
            }
            Op::Trim { vol, offset, len } => {
                rt.block_on(store.trim(vols[vol], offset, len)).unwrap();
                // Whole blocks inside the range become holes (zeros); partial edges are untouched.
                let first = offset.div_ceil(4096) * 4096;
                let end = (offset + len) / 4096 * 4096;
                if end > first {
                    model[vol][first as usize..end as usize].fill(0);
                }
            }
            Op::Zero { vol, offset, len, may_trim } => {
                rt.block_on(store.write_zeroes(vols[vol], offset, len, may_trim, false)).unwrap();
                model[vol][offset as usize..(offset + len) as usize].fill(0);
            }
            Op::Flush => rt.block_on(store.flush()).unwrap(),
            Op::Read { vol, offset, len } => {
                let got = rt.block_on(store.read(vols[vol], offset, len)).unwrap();
                assert!(
                    got[..] == model[vol][offset as usize..(offset + len) as usize],
                    "step {step}: read {offset}+{len} of v{vol} differs from the model"
                );
            }
            Op::ReadPlaced { vol, runs } => read_placed(&rt, &store, vols[vol], runs, &mut model[vol], step),
            Op::WriteScattered { vol, lbas, seed } => {
                let blocks: Vec<(u64, Bytes)> = lbas
                    .iter()
                    .enumerate()
                    .map(|(i, &lba)| (lba, Bytes::from(pattern(seed ^ i as u64, 4096))))
                    .collect();
                for (lba, data) in &blocks {
                    model[vol][(*lba * 4096) as usize..(*lba * 4096 + 4096) as usize].copy_from_slice(data);
                }
                let tag = Tag::NONE;
                rt.block_on(async { store.enqueue_write_blocks(vols[vol], blocks, tag).await.unwrap().wait().await })
                    .unwrap();
            }
            Op::Checkpoint => rt.block_on(store.checkpoint()).unwrap(),
            Op::Reopen => {
                let st = rt.block_on(store.stats()).unwrap();
                cleaned += st.segments_cleaned;
                copied += st.gc_blocks_copied;
                store.close().unwrap();
                store = open(&disk, seed ^ step as u64);
            }
        }
    }
    for (i, m) in model.iter().enumerate() {
        let got = rt.block_on(store.read(vols[i], 0, VOL_BYTES)).unwrap();
        assert!(got[..] == m[..], "final read of v{i} differs from the model");
    }
    let mut stats = rt.block_on(store.stats()).unwrap();
    stats.segments_cleaned += cleaned;
    stats.gc_blocks_copied += copied;
    store.close().unwrap();
    // And once more after a clean reopen.
    let store = open(&disk, seed + 1);
    for (i, m) in model.iter().enumerate() {
        let got = rt.block_on(store.read(vols[i], 0, VOL_BYTES)).unwrap();
        assert!(got[..] == m[..], "v{i} differs from the model after reopen");
    }
    store.close().unwrap();
    stats
}

/// Checks `block_places` and `enqueue_read_blocks` against the model: places name exactly the
/// blocks the read finds mapped, in LBA order inside the runs, and the read (in log order, as a
/// replica's copy asks) returns each block's data, `None` only where the model holds zeros.
/// A write to the first run's first block is queued, not awaited, just before: the places and the
/// read must see it while it is still unapplied.
fn read_placed(
    rt: &tokio::runtime::Runtime,
    store: &Store,
    vol: VolumeId,
    runs: [(u64, u64); 2],
    model: &mut [u8],
    step: usize,
) {
    let n = VOL_BYTES / 4096;
    let mut runs: Vec<(u64, u64)> = runs.iter().map(|&(b, len)| (b, (b + len).min(n))).collect();
    runs.sort_unstable();
    if runs[1].0 <= runs[0].1 {
        runs = vec![(runs[0].0, runs[0].1.max(runs[1].1))];
    }
    let block_runs: Vec<BlockRun> = runs.iter().map(|&(a, b)| BlockRun { lba: Lba(a), n_blocks: b - a }).collect();
    let data = Bytes::from(pattern(step as u64 ^ 0x5eed, 4096));
    let offset = runs[0].0 * 4096;
    let written = rt.block_on(store.enqueue_write(vol, offset, data.clone(), false, Tag::NONE)).unwrap();
    model[offset as usize..offset as usize + 4096].copy_from_slice(&data);
    let places = rt.block_on(store.block_places(vol, block_runs)).unwrap();
    assert!(places.windows(2).all(|w| w[0].lba < w[1].lba), "step {step}: places out of LBA order: {places:?}");
    assert!(
        places.iter().all(|p| runs.iter().any(|&(a, b)| (a..b).contains(&p.lba))),
        "step {step}: place outside the runs"
    );
    let mut by_place = places.clone();
    by_place.sort_unstable();
    let placed: std::collections::BTreeSet<u64> = places.iter().map(|p| p.lba).collect();
    let mut lbas: Vec<u64> = by_place.iter().map(|p| p.lba).collect();
    lbas.extend(runs.iter().flat_map(|&(a, b)| a..b).filter(|l| !placed.contains(l)));
    let got = rt.block_on(async { store.enqueue_read_blocks(vol, lbas.clone()).await.unwrap().wait().await }).unwrap();
    assert_eq!(got.len(), lbas.len());
    for (lba, block) in lbas.iter().zip(got) {
        let want = &model[(lba * 4096) as usize..((lba + 1) * 4096) as usize];
        match block {
            Some(d) => {
                assert!(placed.contains(lba), "step {step}: block {lba} read as mapped but not placed");
                assert!(d[..] == want[..], "step {step}: block {lba} read in log order differs from the model");
            }
            None => {
                assert!(!placed.contains(lba), "step {step}: block {lba} placed but read as unmapped");
                assert!(want.iter().all(|&b| b == 0), "step {step}: block {lba} read as unmapped but holds data");
            }
        }
    }
    rt.block_on(written.wait()).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn engine_matches_byte_model(ops in proptest::collection::vec(op(), 1..300), seed in any::<u64>()) {
        run(ops, seed, 4 << 20);
    }
}

/// Long enough to wrap the small store several times over, so cleaning and segment reuse are
/// certain to happen (the proptest cases are shorter and random).
#[test]
fn long_overwrite_run_exercises_the_cleaner() {
    let mut ops = Vec::new();
    let n_blocks = VOL_BYTES / 4096;
    // Fill everything once (cold data), then overwrite uniformly at random.
    for vol in 0..N_VOLS {
        ops.push(Op::Write { vol, offset: 0, len: VOL_BYTES, seed: vol as u64, fua: false, write_back: false });
    }
    let mut rng = syncblock_engine::sim::Rng::new(11);
    for i in 0..3000u64 {
        let vol = rng.below(N_VOLS as u64) as usize;
        let block = rng.below(n_blocks);
        let len = 4096 * (1 + rng.below(3)).min(n_blocks - block);
        ops.push(Op::Write { vol, offset: block * 4096, len, seed: 100 + i, fua: false, write_back: i % 2 == 0 });
        if i % 97 == 0 {
            ops.push(Op::Flush);
        }
        if i % 1001 == 0 {
            ops.push(Op::Reopen);
        }
        if i % 13 == 0 {
            ops.push(Op::Read { vol, offset: 0, len: VOL_BYTES });
        }
    }
    // 3.625 MiB, of which the two checkpoint slots (sized for the worst case: every volume, 64
    // replicated ones with staged resyncs) take a good part: what is left for 1.1 MiB of volumes,
    // with tiny records (a header per 1-4 data blocks), is about two thirds full.
    let stats = run(ops, 7, (3 << 20) + (640 << 10));
    assert!(stats.segments_cleaned > 10, "the cleaner should have run: {stats:?}");
    assert!(stats.gc_blocks_copied > 0, "the cleaner should have copied live blocks: {stats:?}");
}
