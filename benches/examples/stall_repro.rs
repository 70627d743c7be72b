//! Looks for the engine going idle with writes outstanding (a lost wake-up), on the simulated
//! device with seeded completion order, so that a hang found here replays from its seed.
//!
//! ```text
//! cargo run --release -p syncblock-benches --example stall_repro -- [first_seed] [n_seeds] [store_mib] [volume_mib]
//! ```
//!
//! Per seed: a store (default 64 MiB) of 1 MiB segments, a volume (default 40 MiB) filled
//! sequentially, overwritten at random once, then overwritten sequentially 4 times in 1 MiB writes
//! with 4 in flight. A phase not done within 10 s is reported as a hang (each takes well under a
//! second).

use std::time::Duration;

use syncblock_benches::{run, Limit, Pattern, Workload};
use syncblock_engine::sim::{SimDevice, SimDisk};
use syncblock_engine::{Config, Store};

fn main() {
    let mut args = std::env::args().skip(1);
    let first: u64 = args.next().map_or(0, |s| s.parse().expect("first seed"));
    let n: u64 = args.next().map_or(20, |s| s.parse().expect("seed count"));
    let store_mib: usize = args.next().map_or(64, |s| s.parse().expect("store MiB"));
    let volume_mib: u64 = args.next().map_or(40, |s| s.parse().expect("volume MiB"));
    let rt = syncblock_benches::runtime(1);
    let mut n_hangs = 0;
    for seed in first..first + n {
        let disk = SimDisk::formatted(store_mib << 20, 1 << 20).expect("format");
        let dev = SimDevice::new(disk.clone()).with_reordering(seed);
        let store = Store::open_device(Box::new(dev), Config::default(), "sim").expect("open");
        let volume_bytes = volume_mib << 20;
        let result = rt.block_on(async {
            let volume = store.create_volume("v", volume_bytes).await?;
            // Every phase without the benchmarks' watchdog, each bounded by a timeout.
            let phases = [
                (Workload::standard(Pattern::SeqWrite), volume_bytes >> 20),
                (Workload::standard(Pattern::RandWrite), volume_bytes >> 12),
                (Workload::standard(Pattern::SeqWrite), 4 * (volume_bytes >> 20)),
            ];
            for (phase_idx, (workload, ops)) in phases.into_iter().enumerate() {
                let work = run(&store, volume.id, volume_bytes, workload, Limit::ops(ops), seed, false);
                match tokio::time::timeout(Duration::from_secs(10), work).await {
                    Ok(r) => {
                        r?;
                    }
                    Err(_) => return Ok(Some(phase_idx)),
                }
            }
            Ok::<_, syncblock_engine::Error>(None)
        });
        // The log of every write since the format grows without bound; drop it between seeds.
        disk.lock().expect("sim disk").log.clear();
        match result {
            Ok(None) => println!("seed {seed}: ok"),
            Ok(Some(phase_idx)) => {
                n_hangs += 1;
                let stats = rt.block_on(async {
                    // A request wakes the engine thread; if the hang was a lost wake-up, this
                    // returns and the stalled writes finish behind it.
                    tokio::time::timeout(Duration::from_secs(5), store.stats()).await
                });
                println!(
                    "seed {seed}: HANG in phase {phase_idx} (not done in 10 s); stats request after it: {stats:?}"
                );
            }
            Err(e) => println!("seed {seed}: error {e}"),
        }
        drop(store);
    }
    println!("{n_hangs} hangs in {n} seeds");
}
