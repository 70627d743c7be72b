//! The engine side of `compare.sh`: runs one fio-like workload in-process for a fixed time and prints
//! one JSON line (IOPS, MiB/s and the engine counters of the run).
//!
//! ```text
//! engine_fio prepare --path FILE [--store-bytes 2G] [--volume-bytes 1G] [--overwrite-passes 1]
//! engine_fio run --path FILE --workload randwrite|randread|seqwrite|writeflush [--runtime-s 10]
//!                [--bs 4k] [--in-flight 32] [--fresh] [--store-bytes 2G] [--volume-bytes 1G] [--no-watchdog]
//!                [--engine-thread]
//! ```
//!
//! The engine runs on the same Tokio runtime as the clients (`Driver::Runtime`, as in the
//! `syncblock` binary); `--engine-thread` gives it a thread of its own instead (`Driver::Thread`).
//!
//! `prepare` preallocates FILE (so ext4's block allocation is not measured), creates a store on it
//! with one volume named `bench`, fills the volume sequentially and overwrites it at random
//! `--overwrite-passes` times, so that later runs see a rewritten store with the cleaner active.
//! `run` opens that store and runs the workload; with `--fresh` it instead formats FILE anew and runs
//! on an empty volume (a fresh store: no cleaning until the log wraps).
//!
//! `nudges` in the output counts the times the watchdog had to wake an engine that had gone idle
//! with requests outstanding (see `syncblock_benches::run`); `--no-watchdog` turns it off, and such
//! a run then hangs instead.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use syncblock_benches::{
    fill, parse_bytes, preallocate, random_overwrite, run, runtime, Counters, Limit, Pattern, Workload,
};
use syncblock_engine::{Config, CreateOptions, Driver, Store, DEFAULT_SEGMENT_BYTES};

const VOLUME_NAME: &str = "bench";

/// How far past its run time a workload may go before it counts as hung.
const HANG_GRACE: Duration = Duration::from_secs(60);

/// `--key value` and `--flag` arguments after the subcommand.
struct Args(HashMap<String, Option<String>>);

impl Args {
    fn parse(args: impl Iterator<Item = String>) -> Result<Args> {
        let mut map = HashMap::new();
        let mut args = args.peekable();
        while let Some(a) = args.next() {
            let key = a.strip_prefix("--").ok_or_else(|| anyhow!("unexpected argument {a:?}"))?.to_string();
            let value = args.next_if(|v| !v.starts_with("--"));
            map.insert(key, value);
        }
        Ok(Args(map))
    }

    fn str(&mut self, key: &str) -> Option<String> {
        self.0.remove(key).flatten()
    }

    fn flag(&mut self, key: &str) -> bool {
        self.0.remove(key).is_some()
    }

    fn bytes(&mut self, key: &str, default: u64) -> Result<u64> {
        match self.str(key) {
            Some(s) => parse_bytes(&s).ok_or_else(|| anyhow!("--{key}: cannot parse {s:?} as a size")),
            None => Ok(default),
        }
    }

    fn num<T: std::str::FromStr>(&mut self, key: &str, default: T) -> Result<T> {
        match self.str(key) {
            Some(s) => s.parse().map_err(|_| anyhow!("--{key}: cannot parse {s:?}")),
            None => Ok(default),
        }
    }

    fn finish(self) -> Result<()> {
        if let Some(k) = self.0.keys().next() {
            bail!("unknown option --{k}");
        }
        Ok(())
    }
}

fn main() -> Result<()> {
    let mut argv = std::env::args().skip(1);
    let cmd = argv.next().unwrap_or_default();
    let mut args = Args::parse(argv)?;
    let path = PathBuf::from(args.str("path").ok_or_else(|| anyhow!("--path FILE is required"))?);
    let store_bytes = args.bytes("store-bytes", 2 << 30)?;
    let volume_bytes = args.bytes("volume-bytes", 1 << 30)?;
    let segment_bytes = args.bytes("segment-bytes", DEFAULT_SEGMENT_BYTES)?;
    let client_threads = args.num("client-threads", 1usize)?;
    let rt = runtime(client_threads);
    let driver = if args.flag("engine-thread") { Driver::Thread } else { Driver::Runtime(rt.handle().clone()) };
    let cfg = Config { driver, ..Config::default() };
    let create = CreateOptions { size_bytes: store_bytes, segment_bytes, zero_fill: false };
    match cmd.as_str() {
        "prepare" => {
            let passes: u64 = args.num("overwrite-passes", 1)?;
            args.finish()?;
            let t = Instant::now();
            preallocate(&path, store_bytes).with_context(|| format!("preallocating {}", path.display()))?;
            let prealloc_s = t.elapsed().as_secs_f64();
            let store = Store::create(&path, &create, cfg.clone())?;
            let volume = rt.block_on(store.create_volume(VOLUME_NAME, volume_bytes))?;
            let before = rt.block_on(store.stats())?;
            let filled = rt.block_on(fill(&store, volume.id, volume_bytes))?;
            let rewritten =
                rt.block_on(random_overwrite(&store, volume.id, volume_bytes, passes * volume_bytes, 32, 1))?;
            let after = rt.block_on(store.stats())?;
            store.close()?;
            let c = Counters::between(&before, &after);
            println!(
                "{{\"engine\":\"syncblock\",\"phase\":\"prepare\",\"prealloc_s\":{prealloc_s:.1},\"fill_mib_s\":{:.1},\
                 \"overwrite_mib_s\":{:.1},\"wa\":{:.3},\"gc_blocks_copied\":{},\"segments_cleaned\":{},\"free_segments\":{},\"nudges\":{}}}",
                filled.mib_per_s(),
                rewritten.mib_per_s(),
                c.write_amplification(),
                c.gc_blocks_copied,
                c.segments_cleaned,
                after.free_segments,
                filled.nudges + rewritten.nudges,
            );
        }
        "run" => {
            let pattern_name = args.str("workload").ok_or_else(|| anyhow!("--workload is required"))?;
            let pattern = Pattern::parse(&pattern_name).ok_or_else(|| anyhow!("unknown workload {pattern_name:?}"))?;
            let mut workload = Workload::standard(pattern);
            workload.block_bytes = args.bytes("bs", workload.block_bytes)?;
            workload.in_flight = args.num("in-flight", workload.in_flight)?;
            let runtime_s: f64 = args.num("runtime-s", 10.0)?;
            let fresh = args.flag("fresh");
            let watchdog = !args.flag("no-watchdog");
            let seed: u64 = args.num("seed", std::process::id() as u64)?;
            args.finish()?;
            let (store, volume) = if fresh {
                if !syncblock_benches::is_preallocated(&path, store_bytes) {
                    preallocate(&path, store_bytes)?;
                }
                let store = Store::create(&path, &create, cfg.clone())?;
                let volume = rt.block_on(store.create_volume(VOLUME_NAME, volume_bytes))?;
                if pattern == Pattern::RandRead {
                    rt.block_on(fill(&store, volume.id, volume_bytes))?;
                }
                (store, volume)
            } else {
                let store = Store::open(&path, cfg.clone())
                    .with_context(|| format!("opening {} (run `engine_fio prepare` first)", path.display()))?;
                let volume = rt.block_on(store.volume(VOLUME_NAME))?;
                (store, volume)
            };
            let before = rt.block_on(store.stats())?;
            let limit = Limit::duration(Duration::from_secs_f64(runtime_s));
            // A run that overshoots its time by a minute has hung; fail it rather than wait forever.
            let hang_limit = Duration::from_secs_f64(runtime_s) + HANG_GRACE;
            let outcome = rt
                .block_on(async {
                    tokio::time::timeout(
                        hang_limit,
                        run(&store, volume.id, volume.size_bytes, workload, limit, seed, watchdog),
                    )
                    .await
                })
                .unwrap_or_else(|_| {
                    // Exit at once: closing the store would wait on the hung engine.
                    eprintln!("engine hung: the {pattern_name} run did not finish within {hang_limit:?}");
                    std::process::exit(3)
                })?;
            let after = rt.block_on(store.stats())?;
            store.close()?;
            let c = Counters::between(&before, &after);
            println!(
                "{{\"engine\":\"syncblock\",\"workload\":\"{}\",\"store\":\"{}\",\"bs\":{},\"in_flight\":{},\"secs\":{:.2},\
                 \"ops\":{},\"iops\":{:.0},\"mib_s\":{:.1},\"batches\":{},\"syncs\":{},\"blocks_per_batch\":{:.1},\
                 \"wa\":{:.3},\"gc_blocks_copied\":{},\"segments_cleaned\":{},\"checkpoints\":{},\"nudges\":{}}}",
                pattern.name(),
                if fresh { "fresh" } else { "rewritten" },
                workload.block_bytes,
                workload.in_flight,
                outcome.elapsed.as_secs_f64(),
                outcome.ops,
                outcome.iops(),
                outcome.mib_per_s(),
                c.batches,
                c.syncs,
                c.log_blocks_written as f64 / c.batches.max(1) as f64,
                c.write_amplification(),
                c.gc_blocks_copied,
                c.segments_cleaned,
                c.checkpoints,
                outcome.nudges,
            );
        }
        _ => bail!("usage: engine_fio prepare|run --path FILE [options] (see the file's doc comment)"),
    }
    Ok(())
}
