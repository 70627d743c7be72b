//! Workloads shared by the engine benchmarks: the criterion benches (`benches/engine.rs`), the
//! write-amplification runner (`src/bin/wa.rs`) and the fio comparison driver
//! (`src/bin/engine_fio.rs`, run by `compare.sh`).
//!
//! Each workload mirrors one fio job so that the comparison is like for like: the same block size,
//! the same number of requests in flight, uniform random offsets (fio `--norandommap`) or a
//! sequential cursor that wraps at the end of the volume.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use syncblock_engine::buf::AlignedBuf;
use syncblock_engine::{Stats, Store, VolumeId, BLOCK_BYTES, BLOCK_BYTES_U64};

/// Bytes per write when filling a volume or preallocating a file: large sequential transfers.
pub const FILL_WRITE_BYTES: u64 = 1 << 20;
/// Writes in flight while filling: enough to keep the engine's batch pipeline full.
pub const FILL_IN_FLIGHT: usize = 4;

/// Where benchmark files go: `$SYNCBLOCK_BENCH_DIR`, else the system temp dir.
///
/// The point of these benchmarks is the real disk, so a tmpfs (e.g. `/dev/shm`) is refused: it
/// would measure memory copies, not I/O.
pub fn bench_dir() -> io::Result<PathBuf> {
    let dir = std::env::var_os("SYNCBLOCK_BENCH_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    if is_tmpfs(&dir)? {
        return Err(io::Error::other(format!(
            "{} is a tmpfs: benchmarks must run on a real disk; set SYNCBLOCK_BENCH_DIR to a directory on one",
            dir.display()
        )));
    }
    Ok(dir)
}

fn is_tmpfs(dir: &Path) -> io::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: c_path is a NUL-terminated string and st points to writable memory of the right type.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statfs returned 0, so it filled the struct.
    let st = unsafe { st.assume_init() };
    Ok(st.f_type == libc::TMPFS_MAGIC)
}

/// Writes every byte of `path` (creating it, `size_bytes` long) with `O_DIRECT`, so that later
/// benchmark writes overwrite allocated extents instead of paying the file system's block
/// allocation (a sparse file's first write to each extent costs extra metadata work in ext4).
pub fn preallocate(path: &Path, size_bytes: u64) -> io::Result<()> {
    let file = OpenOptions::new().create(true).truncate(false).write(true).custom_flags(libc::O_DIRECT).open(path)?;
    let chunk_blocks = (FILL_WRITE_BYTES / BLOCK_BYTES_U64) as usize;
    let mut buf = AlignedBuf::zeroed(chunk_blocks);
    buf.fill(0xa5);
    let mut offset = 0;
    while offset < size_bytes {
        let n = (size_bytes - offset).min(FILL_WRITE_BYTES) as usize;
        assert_eq!(n % BLOCK_BYTES, 0, "preallocate needs whole blocks");
        file.write_all_at(&buf[..n], offset)?;
        offset += n as u64;
    }
    file.sync_all()
}

/// Whether `path` exists with at least `size_bytes` allocated on disk (not sparse).
pub fn is_preallocated(path: &Path, size_bytes: u64) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).is_ok_and(|m| m.len() >= size_bytes && m.blocks() * 512 >= size_bytes)
}

/// The access pattern of a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Uniform random offsets (fio `--rw=randwrite --norandommap`).
    RandWrite,
    /// Uniform random offsets (fio `--rw=randread --norandommap`).
    RandRead,
    /// A cursor shared by all requests, wrapping at the end of the span (fio `--rw=write`).
    SeqWrite,
    /// A random write followed by a flush, per request (fio `--rw=randwrite --fdatasync=1`).
    WriteFlush,
}

impl Pattern {
    pub const ALL: [Pattern; 4] = [Pattern::RandWrite, Pattern::RandRead, Pattern::SeqWrite, Pattern::WriteFlush];

    pub fn name(self) -> &'static str {
        match self {
            Pattern::RandWrite => "randwrite",
            Pattern::RandRead => "randread",
            Pattern::SeqWrite => "seqwrite",
            Pattern::WriteFlush => "writeflush",
        }
    }

    pub fn parse(s: &str) -> Option<Pattern> {
        Pattern::ALL.into_iter().find(|p| p.name() == s)
    }
}

/// A pattern with its request size and the number of requests kept in flight.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    pub pattern: Pattern,
    pub block_bytes: u64,
    pub in_flight: usize,
}

impl Workload {
    /// The workloads the issue names: 4 KiB random write and read with 32 in flight, 1 MiB
    /// sequential write with 4 in flight, 4 KiB write+flush with 1 in flight.
    pub fn standard(pattern: Pattern) -> Workload {
        let (block_bytes, in_flight) = match pattern {
            Pattern::RandWrite | Pattern::RandRead => (4096, 32),
            Pattern::SeqWrite => (1 << 20, 4),
            Pattern::WriteFlush => (4096, 1),
        };
        Workload { pattern, block_bytes, in_flight }
    }
}

/// When a workload stops: after `ops` requests, or at `deadline`, whichever comes first.
#[derive(Debug, Clone, Copy)]
pub struct Limit {
    pub ops: u64,
    pub deadline: Option<Instant>,
}

impl Limit {
    pub fn ops(ops: u64) -> Limit {
        Limit { ops, deadline: None }
    }

    pub fn duration(d: Duration) -> Limit {
        Limit { ops: u64::MAX, deadline: Some(Instant::now() + d) }
    }
}

/// What a workload did.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub ops: u64,
    pub bytes: u64,
    pub elapsed: Duration,
    /// Watchdog periods in which no request completed and the watchdog woke the engine (see
    /// [`WATCHDOG_PERIOD`]). Non-zero means the engine went idle with work outstanding.
    pub nudges: u64,
}

impl Outcome {
    pub fn iops(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    pub fn mib_per_s(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64() / (1 << 20) as f64
    }
}

/// The engine's seedable SplitMix64 generator: benchmarks need speed and repeatability, not
/// statistical perfection.
pub use syncblock_engine::sim::Rng;

/// How long the watchdog lets pass without any request completing before it sends the engine a
/// `stats` request. Far above any request's latency here (a 1 MiB write takes a few ms), so on a
/// healthy engine it never fires; when it does fire, the engine thread was asleep with requests
/// outstanding, and the request wakes it up.
pub const WATCHDOG_PERIOD: Duration = Duration::from_millis(100);

/// Runs `workload` against the first `span_bytes` of `volume` until `limit`, with
/// `workload.in_flight` requests outstanding at all times. `seed` varies the random offsets.
///
/// With `watchdog`, a task wakes the engine whenever no request completed for a
/// [`WATCHDOG_PERIOD`], and counts how often it had to ([`Outcome::nudges`]). This works around an
/// engine thread that goes to sleep with writes stalled for space and nothing in flight to wake it;
/// without it such a run hangs.
///
/// Must be called inside a Tokio runtime; the requests run as spawned tasks.
pub async fn run(
    store: &Store,
    volume: VolumeId,
    span_bytes: u64,
    workload: Workload,
    limit: Limit,
    seed: u64,
    watchdog: bool,
) -> syncblock_engine::Result<Outcome> {
    assert!(workload.block_bytes % BLOCK_BYTES_U64 == 0 && workload.block_bytes > 0, "whole blocks only");
    let n_slots = span_bytes / workload.block_bytes;
    assert!(n_slots > 0, "span smaller than one request");
    let issued = Arc::new(AtomicU64::new(0));
    let completed = Arc::new(AtomicU64::new(0));
    let nudges = Arc::new(AtomicU64::new(0));
    let _watchdog = watchdog.then(|| {
        let store = store.clone();
        let completed = completed.clone();
        let nudges = nudges.clone();
        AbortOnDrop(tokio::spawn(async move {
            let mut last = u64::MAX;
            loop {
                tokio::time::sleep(WATCHDOG_PERIOD).await;
                let now = completed.load(Ordering::Relaxed);
                if now == last {
                    nudges.fetch_add(1, Ordering::Relaxed);
                    let _ = tokio::time::timeout(WATCHDOG_PERIOD, store.stats()).await;
                }
                last = now;
            }
        }))
    });
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(workload.in_flight);
    for task_idx in 0..workload.in_flight {
        let store = store.clone();
        let issued = issued.clone();
        let completed = completed.clone();
        let data = pattern_bytes(seed ^ task_idx as u64, workload.block_bytes as usize);
        let mut rng = Rng::new(seed.wrapping_mul(1000).wrapping_add(task_idx as u64));
        tasks.push(tokio::spawn(async move {
            let mut n_ops = 0u64;
            loop {
                if limit.deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let op_idx = issued.fetch_add(1, Ordering::Relaxed);
                if op_idx >= limit.ops {
                    break;
                }
                let slot = match workload.pattern {
                    Pattern::SeqWrite => op_idx % n_slots,
                    _ => rng.below(n_slots),
                };
                let offset = slot * workload.block_bytes;
                match workload.pattern {
                    Pattern::RandRead => {
                        let got = store.read(volume, offset, workload.block_bytes).await?;
                        debug_assert_eq!(got.len() as u64, workload.block_bytes);
                    }
                    Pattern::RandWrite | Pattern::SeqWrite => {
                        store.write(volume, offset, data.clone(), false).await?;
                    }
                    Pattern::WriteFlush => {
                        store.write(volume, offset, data.clone(), false).await?;
                        store.flush().await?;
                    }
                }
                n_ops += 1;
                completed.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<u64, syncblock_engine::Error>(n_ops)
        }));
    }
    let mut ops = 0;
    for task in tasks {
        ops += task.await.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
    }
    let elapsed = start.elapsed();
    Ok(Outcome { ops, bytes: ops * workload.block_bytes, elapsed, nudges: nudges.load(Ordering::Relaxed) })
}

/// Stops a background task when dropped, on every path out of the scope that owns it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Writes the first `len_bytes` of `volume` sequentially in 1 MiB requests, then flushes.
pub async fn fill(store: &Store, volume: VolumeId, len_bytes: u64) -> syncblock_engine::Result<Outcome> {
    let workload = Workload { pattern: Pattern::SeqWrite, block_bytes: FILL_WRITE_BYTES, in_flight: FILL_IN_FLIGHT };
    let n_ops = len_bytes / FILL_WRITE_BYTES;
    let outcome = run(store, volume, len_bytes, workload, Limit::ops(n_ops), 0, true).await?;
    store.flush().await?;
    Ok(outcome)
}

/// Uniform random 4 KiB overwrites of the first `span_bytes` of `volume`, `total_bytes` in all,
/// with `in_flight` outstanding, then a flush.
pub async fn random_overwrite(
    store: &Store,
    volume: VolumeId,
    span_bytes: u64,
    total_bytes: u64,
    in_flight: usize,
    seed: u64,
) -> syncblock_engine::Result<Outcome> {
    let workload = Workload { pattern: Pattern::RandWrite, block_bytes: BLOCK_BYTES_U64, in_flight };
    let outcome =
        run(store, volume, span_bytes, workload, Limit::ops(total_bytes / BLOCK_BYTES_U64), seed, true).await?;
    store.flush().await?;
    Ok(outcome)
}

/// `len` bytes that are not all zeros and differ per seed.
pub fn pattern_bytes(seed: u64, len: usize) -> Bytes {
    let mut rng = Rng::new(seed);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    v.truncate(len);
    Bytes::from(v)
}

/// The engine's monotonic counters between two [`Stats`] snapshots.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    pub user_blocks_written: u64,
    pub gc_blocks_copied: u64,
    pub log_blocks_written: u64,
    pub batches: u64,
    pub syncs: u64,
    pub checkpoints: u64,
    pub segments_cleaned: u64,
}

impl Counters {
    pub fn between(before: &Stats, after: &Stats) -> Counters {
        Counters {
            user_blocks_written: after.user_blocks_written - before.user_blocks_written,
            gc_blocks_copied: after.gc_blocks_copied - before.gc_blocks_copied,
            log_blocks_written: after.log_blocks_written - before.log_blocks_written,
            batches: after.batches - before.batches,
            syncs: after.syncs - before.syncs,
            checkpoints: after.checkpoints - before.checkpoints,
            segments_cleaned: after.segments_cleaned - before.segments_cleaned,
        }
    }

    /// Log blocks written per user block written: [`Stats::write_amplification`] over the interval.
    pub fn write_amplification(&self) -> f64 {
        let stats = Stats {
            log_blocks_written: self.log_blocks_written,
            user_blocks_written: self.user_blocks_written,
            ..Stats::default()
        };
        stats.write_amplification()
    }

    /// (user + cleaner copies) / user: the cleaner's share alone, without record and segment headers.
    pub fn gc_write_amplification(&self) -> f64 {
        (self.user_blocks_written + self.gc_blocks_copied) as f64 / self.user_blocks_written.max(1) as f64
    }

    /// Record and segment header blocks: everything in the log that is neither user data nor a copy.
    pub fn header_blocks(&self) -> u64 {
        self.log_blocks_written.saturating_sub(self.user_blocks_written + self.gc_blocks_copied)
    }
}

/// Index RAM per mapped block, in bytes.
pub fn index_bytes_per_block(stats: &Stats) -> f64 {
    stats.index_heap_bytes as f64 / stats.live_blocks.max(1) as f64
}

/// The runtime the benchmarks drive the engine from. The engine has its own thread; on a 2-core
/// machine one client worker leaves the other core to it.
pub fn runtime(client_threads: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(client_threads.max(1))
        .enable_time()
        .enable_io()
        .build()
        .expect("building the tokio runtime")
}

/// Parses `4096`, `4k`, `1M`, `2G` (binary multiples).
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_bytes_takes_binary_suffixes() {
        assert_eq!(parse_bytes("4096"), Some(4096));
        assert_eq!(parse_bytes("4k"), Some(4096));
        assert_eq!(parse_bytes("1M"), Some(1 << 20));
        assert_eq!(parse_bytes("2G"), Some(2 << 30));
        assert_eq!(parse_bytes("x"), None);
    }

    #[test]
    fn rng_below_stays_in_range() {
        let mut rng = Rng::new(7);
        assert!((0..10_000).all(|_| rng.below(13) < 13));
    }
}
