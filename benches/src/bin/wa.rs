//! Write-amplification runner: fills one volume to a fraction of the store's data capacity, then
//! overwrites it at uniform random 4 KiB offsets and reports the cleaner's cost.
//!
//! ```text
//! wa [--store-bytes 2G] [--segment-bytes 8M] [--fill-pct 75] [--passes 3] [--in-flight 32] [--dir DIR]
//! ```
//!
//! Write amplification is [`Stats::write_amplification`] (log blocks written / user blocks written)
//! over the overwrite phase only, as the difference of the counters before and after it. It is
//! printed per pass too: the first pass starts with the free space the fill left and so is cheaper
//! than the steady state the later passes approach.

use std::time::Instant;

use anyhow::{anyhow, Result};
use syncblock_benches::{bench_dir, fill, index_bytes_per_block, parse_bytes, random_overwrite, runtime, Counters};
use syncblock_engine::{Config, CreateOptions, Stats, Store, DEFAULT_SEGMENT_BYTES};

fn main() -> Result<()> {
    let mut store_bytes: u64 = 2 << 30;
    let mut segment_bytes = DEFAULT_SEGMENT_BYTES;
    let mut fill_pct: u64 = 75;
    let mut passes: u64 = 3;
    let mut in_flight: usize = 32;
    let mut dir = None;
    let mut argv = std::env::args().skip(1);
    while let Some(key) = argv.next() {
        let value = argv.next().ok_or_else(|| anyhow!("{key} needs a value"))?;
        let bytes = || parse_bytes(&value).ok_or_else(|| anyhow!("{key}: cannot parse {value:?} as a size"));
        match key.as_str() {
            "--store-bytes" => store_bytes = bytes()?,
            "--segment-bytes" => segment_bytes = bytes()?,
            "--fill-pct" => fill_pct = value.parse()?,
            "--passes" => passes = value.parse()?,
            "--in-flight" => in_flight = value.parse()?,
            "--dir" => dir = Some(std::path::PathBuf::from(value)),
            _ => return Err(anyhow!("unknown option {key} (see the doc comment of benches/src/bin/wa.rs)")),
        }
    }
    let dir = match dir {
        Some(d) => d,
        None => bench_dir()?,
    };
    let tmp = tempfile::Builder::new().prefix("syncblock-wa-").tempdir_in(&dir)?;
    let path = tmp.path().join("store.img");
    let rt = runtime(1);

    let store = Store::create(
        &path,
        &CreateOptions { size_bytes: store_bytes, segment_bytes, zero_fill: false },
        Config::default(),
    )?;
    let s0 = rt.block_on(store.stats())?;
    // Data capacity: every segment's bytes. Headers and the cleaner's reserve come out of the
    // remaining 25 %, as they would for a user who sizes volumes against the advertised capacity.
    let capacity_bytes = s0.n_segments as u64 * s0.segment_bytes;
    let volume_bytes = capacity_bytes * fill_pct / 100 / (1 << 20) * (1 << 20);
    println!("store:   {} ({} MiB file)", path.display(), store_bytes >> 20);
    println!(
        "layout:  {} segments x {} MiB = {} MiB data capacity; volume {} MiB = {:.1} % of it",
        s0.n_segments,
        s0.segment_bytes >> 20,
        capacity_bytes >> 20,
        volume_bytes >> 20,
        100.0 * volume_bytes as f64 / capacity_bytes as f64
    );
    let volume = rt.block_on(store.create_volume("wa", volume_bytes))?;

    let t = Instant::now();
    let filled = rt.block_on(fill(&store, volume.id, volume_bytes))?;
    let s1 = rt.block_on(store.stats())?;
    println!(
        "fill:    {} MiB sequential in {:.1} s ({:.0} MiB/s), WA {:.3}",
        volume_bytes >> 20,
        t.elapsed().as_secs_f64(),
        filled.mib_per_s(),
        Counters::between(&s0, &s1).write_amplification()
    );

    println!(
        "{:<8} {:>9} {:>8} {:>8} {:>12} {:>9} {:>6} {:>5} {:>8}",
        "pass", "MiB/s", "WA", "WA(gc)", "gc_copied", "cleaned", "ckpts", "free", "hdr_blks"
    );
    // snapshots[k] = stats after pass k (snapshots[0]: after the fill).
    let mut snapshots = vec![s1.clone()];
    let mut nudges = 0;
    for pass in 1..=passes {
        let outcome = rt.block_on(random_overwrite(&store, volume.id, volume_bytes, volume_bytes, in_flight, pass))?;
        let now = rt.block_on(store.stats())?;
        nudges += outcome.nudges;
        print_row(
            &format!("{pass}"),
            outcome.mib_per_s(),
            &Counters::between(&snapshots[pass as usize - 1], &now),
            &now,
        );
        snapshots.push(now);
    }
    let s2 = snapshots.last().expect("fill snapshot").clone();
    let total = Counters::between(&s1, &s2);
    print_row("total", f64::NAN, &total, &s2);
    if passes > 1 {
        // Pass 1 still spends the free space the fill left behind; the later passes are closer to
        // the steady state.
        print_row("2..last", f64::NAN, &Counters::between(&snapshots[1], &s2), &s2);
    }
    println!();
    println!(
        "RESULT write_amplification={:.3} (log blocks / user blocks over {} x {} MiB uniform random 4 KiB overwrites at {} % full)",
        total.write_amplification(),
        passes,
        volume_bytes >> 20,
        fill_pct
    );
    if passes > 1 {
        println!(
            "RESULT write_amplification_steady={:.3} (passes 2..{passes}, after the fill's free space is used up)",
            Counters::between(&snapshots[1], &s2).write_amplification()
        );
    }
    println!(
        "RESULT gc_blocks_copied={} segments_cleaned={} checkpoints={} user_blocks={} log_blocks={} header_blocks={}",
        total.gc_blocks_copied,
        total.segments_cleaned,
        total.checkpoints,
        total.user_blocks_written,
        total.log_blocks_written,
        total.header_blocks()
    );
    println!("RESULT watchdog_nudges={nudges} (times the engine had to be woken with writes outstanding)");
    println!(
        "RESULT index_bytes_per_block={:.2} (index_heap_bytes={} / live_blocks={})",
        index_bytes_per_block(&s2),
        s2.index_heap_bytes,
        s2.live_blocks
    );
    store.close()?;
    Ok(())
}

fn print_row(label: &str, mib_s: f64, c: &Counters, now: &Stats) {
    println!(
        "{:<8} {:>9.1} {:>8.3} {:>8.3} {:>12} {:>9} {:>6} {:>5} {:>8}",
        label,
        mib_s,
        c.write_amplification(),
        c.gc_write_amplification(),
        c.gc_blocks_copied,
        c.segments_cleaned,
        c.checkpoints,
        now.free_segments,
        c.header_blocks()
    );
}
