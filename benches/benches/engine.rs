//! Criterion benches of the engine in-process, on a preallocated file on the real disk
//! (`$SYNCBLOCK_BENCH_DIR`, else the system temp dir; a tmpfs is refused).
//!
//! The four workloads the issue names: 4 KiB random write and 4 KiB random read with 32 in flight,
//! 1 MiB sequential write (4 in flight), 4 KiB write+flush with 1 in flight. Each gets a freshly
//! formatted store, large enough that the log does not wrap during the bench, so these are
//! fresh-store figures: no cleaning. `compare.sh` measures the rewritten store, with the cleaner
//! busy, against fio.
//!
//! One criterion iteration is one request; throughput is in bytes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use syncblock_benches::{bench_dir, fill, preallocate, run, runtime, Limit, Pattern, Workload};
use syncblock_engine::{Config, CreateOptions, Store, DEFAULT_SEGMENT_BYTES};

/// The store file: big enough that about 8 s of writing at the fastest rate seen here (~800 MiB/s)
/// never wraps the log, so no bench waits for the cleaner.
const STORE_BYTES: u64 = 8 << 30;
/// The volume the write benches spread over.
const VOLUME_BYTES: u64 = 1 << 30;
/// The prefilled region the read bench reads from: smaller than the volume to keep setup short.
const READ_SPAN_BYTES: u64 = 256 << 20;

fn engine(c: &mut Criterion) {
    let dir = tempfile::Builder::new()
        .prefix("syncblock-bench-")
        .tempdir_in(bench_dir().expect("benchmark directory"))
        .expect("temp dir");
    let path = dir.path().join("store.img");
    // Written once up front so the benches measure the engine, not ext4's block allocation.
    preallocate(&path, STORE_BYTES).expect("preallocating the store file");
    let rt = runtime(1);
    let seed = AtomicU64::new(1);
    let nudges = AtomicU64::new(0);

    let mut group = c.benchmark_group("engine");
    for pattern in Pattern::ALL {
        let workload = Workload::standard(pattern);
        let store = Store::create(
            &path,
            &CreateOptions { size_bytes: STORE_BYTES, segment_bytes: DEFAULT_SEGMENT_BYTES, zero_fill: false },
            Config::default(),
        )
        .expect("creating the store");
        let volume = rt.block_on(store.create_volume("bench", VOLUME_BYTES)).expect("creating the volume");
        let span_bytes = if pattern == Pattern::RandRead {
            rt.block_on(fill(&store, volume.id, READ_SPAN_BYTES)).expect("filling the read span");
            READ_SPAN_BYTES
        } else {
            VOLUME_BYTES
        };
        let name = format!("{}_{}k_qd{}", pattern.name(), workload.block_bytes >> 10, workload.in_flight);
        group.throughput(Throughput::Bytes(workload.block_bytes));
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let seed = seed.fetch_add(1, Ordering::Relaxed);
                let outcome = rt
                    .block_on(run(&store, volume.id, span_bytes, workload, Limit::ops(iters), seed, true))
                    .expect("workload");
                nudges.fetch_add(outcome.nudges, Ordering::Relaxed);
                outcome.elapsed
            })
        });
        let stats = rt.block_on(store.stats()).expect("stats");
        eprintln!(
            "  engine stats: batches={} syncs={} log_blocks={} user_blocks={} gc_blocks_copied={} free_segments={}/{} watchdog_nudges={}",
            stats.batches,
            stats.syncs,
            stats.log_blocks_written,
            stats.user_blocks_written,
            stats.gc_blocks_copied,
            stats.free_segments,
            stats.n_segments,
            nudges.swap(0, Ordering::Relaxed)
        );
        store.close().expect("closing the store");
    }
    group.finish();
}

criterion_group! {
    name = benches;
    // Short runs: the machine has 2 shared cores, and the whole suite should finish in under
    // three minutes.
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    targets = engine
}
criterion_main!(benches);
