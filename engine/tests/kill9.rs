//! Real-process crash test: the engine runs in a child process under concurrent load on a real
//! file and is SIGKILLed at a random moment, many times; after each kill the parent reopens the
//! store and checks every block against what the child was told was durable.
//!
//! The test binary re-executes itself (as sled's crash test does): with `SYNCBLOCK_KILL9_CHILD` set,
//! the `kill9_child` test runs the workload instead of returning at once.
//!
//! # The verification model
//!
//! Each of the child's writers owns a disjoint, block-aligned region of the volume and awaits each
//! of its operations before issuing the next, so per block the operations form a known sequence in
//! which each was submitted only after the previous one was acknowledged (and so has a higher LSN).
//! Every operation gets a unique generation `gen`. A write fills its bytes from
//! [`pattern_block`]`(lba, gen)`, so any byte range of any version can be recomputed; trims unmap
//! the whole blocks inside their range; zeroing zeroes its bytes.
//!
//! The child appends to two logs:
//! - the *intent log*, one line per operation, written (one `write(2)`) *before* the operation is
//!   submitted. No fsync: a SIGKILL does not lose the page cache, so every operation the engine can
//!   have seen has its line.
//! - the *durable log*, written and fdatasync'd *after* a FUA write is acknowledged, or after a flush
//!   is acknowledged, listing the operations that were acknowledged before that flush was issued.
//!
//! After the kill, each block must equal the state after some prefix of its operation sequence (a
//! block is written atomically, and the log is replayed in LSN order), and that prefix must include
//! the newest operation on the block that the durable log names. "State before the first operation"
//! is what the parent read after the previous round.
//!
//! This is a process crash, not a power cut: completed writes are in the kernel and survive. What
//! it exercises is recovery from a log cut at an arbitrary point of real concurrent io_uring traffic
//! (checkpoints, segment roll-over and the cleaner all run in the child), and that no acknowledged
//! durability promise is broken by that cut. Power cuts are simulated separately on the sim device.

mod common;

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::child_test_command;
use syncblock_engine::sim::Rng;
use syncblock_engine::{Config, CreateOptions, Error, Store, VolumeId, BLOCK_BYTES, BLOCK_BYTES_U64};

/// Set (to the test's directory) in the child's environment: run the workload.
const CHILD_ENV: &str = "SYNCBLOCK_KILL9_CHILD";
const CHILD_ROUND_ENV: &str = "SYNCBLOCK_KILL9_ROUND";
const CHILD_SEED_ENV: &str = "SYNCBLOCK_KILL9_CHILD_SEED";
/// Optional, for the parent: seed of the whole run (printed at the start, to replay a schedule).
const SEED_ENV: &str = "SYNCBLOCK_KILL9_SEED";
/// Optional, for the parent: number of rounds (default [`ROUNDS_DEFAULT`], time-boxed by
/// [`TIME_BUDGET`]), e.g. for a long soak, which is not time-boxed.
const ROUNDS_ENV: &str = "SYNCBLOCK_KILL9_ROUNDS";
/// The name of the child's test fn, passed to the re-executed binary as an exact filter.
const CHILD_TEST: &str = "kill9_child";

/// Rounds in a normal `cargo test` run: about a second each.
const ROUNDS_DEFAULT: u64 = 20;
/// Stop starting rounds after this long (at least [`ROUNDS_MIN`] are run), so a loaded CI machine
/// cannot push the test past a minute.
const TIME_BUDGET: Duration = Duration::from_secs(45);
const ROUNDS_MIN: u64 = 5;

/// Backing file: small enough to create instantly, large enough for ~90 segments of 1 MiB, so that
/// the child rolls segments, checkpoints and cleans within a second.
const STORE_BYTES: u64 = 96 << 20;
const SEGMENT_BYTES: u64 = 1 << 20;
const VOLUME_NAME: &str = "kill9";
const VOLUME_BYTES: u64 = 32 << 20;
/// Writers in the child; each owns `VOLUME_BYTES / WRITERS` bytes of the volume.
const WRITERS: u64 = 4;
const REGION_BYTES: u64 = VOLUME_BYTES / WRITERS;
const _: () = assert!(REGION_BYTES % BLOCK_BYTES_U64 == 0);
/// Largest aligned write: 256 KiB.
const WRITE_BLOCKS_MAX: u64 = 64;
/// A child that is still alive after this long was forgotten by its parent: it exits.
const CHILD_LIFETIME_MAX: Duration = Duration::from_secs(60);

/// The child's engine configuration, varied by round: frequent checkpoints (so that kills land
/// during checkpoint writes) or rare ones (so that recovery replays a long log).
fn child_config(rng: &mut Rng) -> Config {
    let checkpoint_interval_bytes = [1 << 20, 4 << 20, 64 << 20][rng.below(3) as usize];
    let max_inflight_batches = 1 + rng.below(4) as usize;
    Config { checkpoint_interval_bytes, max_inflight_batches, ..Config::default() }
}

// ---------------------------------------------------------------------------------------------
// Content.

/// The full content of block `lba` as written by operation `gen`: gen and lba in the first 16
/// bytes (for diagnostics), then a stream seeded by both.
fn pattern_block(lba: u64, gen: u64) -> [u8; BLOCK_BYTES] {
    let mut b = [0u8; BLOCK_BYTES];
    b[0..8].copy_from_slice(&gen.to_le_bytes());
    b[8..16].copy_from_slice(&lba.to_le_bytes());
    let mut rng = Rng::new(gen.rotate_left(17) ^ lba.wrapping_mul(0x2545_f491_4f6c_dd1d));
    for chunk in b[16..].chunks_mut(8) {
        chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    b
}

/// The bytes operation `gen` writes at `offset..offset + len`.
fn pattern_bytes(offset: u64, len: u64, gen: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len as usize);
    let end = offset + len;
    let mut at = offset;
    while at < end {
        let lba = at / BLOCK_BYTES_U64;
        let block = pattern_block(lba, gen);
        let from = (at % BLOCK_BYTES_U64) as usize;
        let to = ((end - lba * BLOCK_BYTES_U64).min(BLOCK_BYTES_U64)) as usize;
        v.extend_from_slice(&block[from..to]);
        at = lba * BLOCK_BYTES_U64 + to as u64;
    }
    v
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpKind {
    /// `Store::write` (FUA or not).
    Write,
    /// `Store::trim`: whole blocks inside the range are unmapped; partial edge blocks are untouched.
    Trim,
    /// `Store::write_zeroes` (may_trim or not): exactly the range reads as zeros.
    Zero,
}

impl OpKind {
    fn letter(self) -> char {
        match self {
            OpKind::Write => 'W',
            OpKind::Trim => 'T',
            OpKind::Zero => 'Z',
        }
    }
    fn from_letter(c: &str) -> Option<OpKind> {
        match c {
            "W" => Some(OpKind::Write),
            "T" => Some(OpKind::Trim),
            "Z" => Some(OpKind::Zero),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Op {
    gen: u64,
    kind: OpKind,
    offset: u64,
    len: u64,
}

impl Op {
    fn lbas(&self) -> std::ops::Range<u64> {
        if self.len == 0 {
            return 0..0;
        }
        self.offset / BLOCK_BYTES_U64..(self.offset + self.len - 1) / BLOCK_BYTES_U64 + 1
    }

    /// Applies this operation to the content of block `lba`.
    fn apply(&self, lba: u64, block: &mut [u8]) {
        let (b_start, b_end) = (lba * BLOCK_BYTES_U64, lba * BLOCK_BYTES_U64 + BLOCK_BYTES_U64);
        let (start, end) = (self.offset.max(b_start), (self.offset + self.len).min(b_end));
        if start >= end {
            return;
        }
        let range = (start - b_start) as usize..(end - b_start) as usize;
        match self.kind {
            OpKind::Write => block[range.clone()].copy_from_slice(&pattern_block(lba, self.gen)[range]),
            OpKind::Zero => block[range].fill(0),
            OpKind::Trim => {
                if self.offset <= b_start && self.offset + self.len >= b_end {
                    block.fill(0);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The child.

/// Selected (by exact name) in the re-executed binary; a no-op in a normal test run.
#[test]
fn kill9_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else { return };
    child_main(PathBuf::from(dir));
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| v.parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a number")))
}

fn die(what: &str, e: impl std::fmt::Display) -> ! {
    eprintln!("kill9 child: {what}: {e}");
    std::process::exit(2)
}

struct Completed {
    /// Generations of acknowledged operations, in acknowledgement order.
    gens: Vec<u64>,
    /// `gens[..logged]` are already in the durable log.
    logged: usize,
}

struct Ctx {
    store: Store,
    volume: VolumeId,
    round: u64,
    next_gen: AtomicU64,
    intents: Mutex<File>,
    completed: Mutex<Completed>,
    /// To the thread that appends and fdatasyncs the durable log.
    durable: Mutex<mpsc::Sender<Vec<u64>>>,
}

impl Ctx {
    /// Gives the next operation its generation and records the intent, before it is submitted.
    fn intend(&self, kind: OpKind, offset: u64, len: u64) -> u64 {
        let gen = ((self.round + 1) << 40) | self.next_gen.fetch_add(1, Ordering::Relaxed);
        let line = format!("I {gen} {} {offset} {len}\n", kind.letter());
        // One write(2) per line (O_APPEND), so lines never interleave.
        self.intents.lock().unwrap().write_all(line.as_bytes()).unwrap_or_else(|e| die("intent log", e));
        gen
    }

    fn acked(&self, gen: u64, durable: bool) {
        self.completed.lock().unwrap().gens.push(gen);
        if durable {
            self.log_durable(vec![gen]);
        }
    }

    fn log_durable(&self, gens: Vec<u64>) {
        let _ = self.durable.lock().unwrap().send(gens);
    }

    /// Flushes, then logs as durable every operation acknowledged before the flush was issued.
    async fn flush(&self) {
        let n = self.completed.lock().unwrap().gens.len();
        self.store.flush().await.unwrap_or_else(|e| die("flush", e));
        let gens = {
            let mut c = self.completed.lock().unwrap();
            if n > c.logged {
                let gens = c.gens[c.logged..n].to_vec();
                c.logged = n;
                gens
            } else {
                Vec::new()
            }
        };
        if !gens.is_empty() {
            self.log_durable(gens);
        }
    }
}

fn child_main(dir: PathBuf) {
    let round = env_u64(CHILD_ROUND_ENV).expect("round");
    let seed = env_u64(CHILD_SEED_ENV).expect("seed");
    let store_path = dir.join("store.img");
    let open_log = |name: String| {
        OpenOptions::new().create(true).append(true).open(dir.join(name)).unwrap_or_else(|e| die("opening a log", e))
    };
    let mut intents = open_log(format!("intent-{round}.log"));
    let mut durable_file = open_log(format!("durable-{round}.log"));

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut rng = Rng::new(seed);
    let cfg = child_config(&mut rng);
    eprintln!("child config: {cfg:?}");
    // Store::create/open block (they wait for the recovery checkpoint): outside the runtime.
    let store = if round == 0 {
        let opts = CreateOptions { size_bytes: STORE_BYTES, segment_bytes: SEGMENT_BYTES, zero_fill: false };
        Store::create(&store_path, &opts, cfg).unwrap_or_else(|e| die("create", e))
    } else {
        Store::open(&store_path, cfg).unwrap_or_else(|e| die("open", e))
    };
    let volume = rt.block_on(async {
        if round == 0 {
            // Returns once the volume record is durable.
            store.create_volume(VOLUME_NAME, VOLUME_BYTES).await.unwrap_or_else(|e| die("create volume", e)).id
        } else {
            store.volume(VOLUME_NAME).await.unwrap_or_else(|e| die("volume", e)).id
        }
    });
    intents.write_all(b"R\n").unwrap_or_else(|e| die("intent log", e));

    let (tx, rx) = mpsc::channel::<Vec<u64>>();
    std::thread::spawn(move || {
        while let Ok(first) = rx.recv() {
            let mut gens = first;
            while let Ok(more) = rx.try_recv() {
                gens.extend(more);
            }
            let mut line = String::from("D");
            for g in gens {
                line.push_str(&format!(" {g}"));
            }
            line.push('\n');
            durable_file.write_all(line.as_bytes()).unwrap_or_else(|e| die("durable log", e));
            durable_file.sync_data().unwrap_or_else(|e| die("durable log fsync", e));
        }
    });

    let ctx = Arc::new(Ctx {
        store,
        volume,
        round,
        next_gen: AtomicU64::new(1),
        intents: Mutex::new(intents),
        completed: Mutex::new(Completed { gens: Vec::new(), logged: 0 }),
        durable: Mutex::new(tx),
    });
    rt.block_on(async {
        for w in 0..WRITERS {
            tokio::spawn(writer(ctx.clone(), w, Rng::new(rng.next_u64())));
        }
        tokio::spawn(flusher(ctx.clone(), Rng::new(rng.next_u64())));
        // Progress for the parent's round summary: what the engine did before the kill.
        let deadline = tokio::time::Instant::now() + CHILD_LIFETIME_MAX;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let s = ctx.store.stats().await.unwrap_or_else(|e| die("stats", e));
            eprintln!("S {} {} {} {}", s.batches, s.syncs, s.checkpoints, s.segments_cleaned);
        }
    });
    die("lifetime", "the parent never killed this child")
}

async fn writer(ctx: Arc<Ctx>, w: u64, mut rng: Rng) {
    let region = w * REGION_BYTES..(w + 1) * REGION_BYTES;
    let region_blocks = REGION_BYTES / BLOCK_BYTES_U64;
    loop {
        let dice = rng.below(100);
        let fua = rng.below(8) == 0;
        if dice < 55 {
            // Aligned write, 4 KiB to 256 KiB.
            let n_blocks = 1 + rng.below(WRITE_BLOCKS_MAX);
            let lba = rng.below(region_blocks - n_blocks + 1);
            let (offset, len) = (region.start + lba * BLOCK_BYTES_U64, n_blocks * BLOCK_BYTES_U64);
            write(&ctx, offset, len, fua).await;
        } else if dice < 75 {
            // Small write at any byte offset, possibly straddling blocks.
            let len = 1 + rng.below(2 * BLOCK_BYTES_U64);
            let offset = region.start + rng.below(REGION_BYTES - len + 1);
            write(&ctx, offset, len, fua).await;
        } else if dice < 83 {
            // Trim, aligned or not: only the whole blocks inside are unmapped.
            let len = 1 + rng.below(32 * BLOCK_BYTES_U64);
            let mut offset = region.start + rng.below(REGION_BYTES - len + 1);
            if rng.below(2) == 0 {
                offset -= offset % BLOCK_BYTES_U64;
            }
            let gen = ctx.intend(OpKind::Trim, offset, len);
            ctx.store.trim(ctx.volume, offset, len).await.unwrap_or_else(|e| die("trim", e));
            ctx.acked(gen, false);
        } else if dice < 90 {
            let len = 1 + rng.below(16 * BLOCK_BYTES_U64);
            let offset = region.start + rng.below(REGION_BYTES - len + 1);
            let may_trim = rng.below(2) == 0;
            let gen = ctx.intend(OpKind::Zero, offset, len);
            ctx.store
                .write_zeroes(ctx.volume, offset, len, may_trim, fua)
                .await
                .unwrap_or_else(|e| die("write_zeroes", e));
            ctx.acked(gen, fua);
        } else if dice < 93 {
            ctx.flush().await;
        } else {
            // Single-block writes: the common case of a filesystem on top.
            let offset = region.start + rng.below(region_blocks) * BLOCK_BYTES_U64;
            write(&ctx, offset, BLOCK_BYTES_U64, fua).await;
        }
    }
}

async fn write(ctx: &Ctx, offset: u64, len: u64, fua: bool) {
    let gen = ctx.intend(OpKind::Write, offset, len);
    let data = Bytes::from(pattern_bytes(offset, len, gen));
    if !fua && gen % 2 == 0 {
        // Write-back: answered once queued; a kill before the next flush may lose it, as any
        // unflushed write.
        ctx.store.write_back(ctx.volume, offset, data).await.unwrap_or_else(|e| die("write", e));
    } else {
        ctx.store.write(ctx.volume, offset, data, fua).await.unwrap_or_else(|e| die("write", e));
    }
    ctx.acked(gen, fua);
}

async fn flusher(ctx: Arc<Ctx>, mut rng: Rng) {
    loop {
        tokio::time::sleep(Duration::from_micros(rng.below(20_000))).await;
        ctx.flush().await;
        if rng.below(25) == 0 {
            ctx.store.checkpoint().await.unwrap_or_else(|e| die("checkpoint", e));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The parent.

/// Owns the child process: kills and reaps it however the parent's test ends.
struct ChildGuard(Option<Child>);

impl ChildGuard {
    fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("child")
    }

    /// SIGKILLs and reaps the child; returns whether it was still running when killed.
    fn kill(&mut self) -> std::io::Result<bool> {
        let child = self.child();
        let was_running = child.try_wait()?.is_none();
        child.kill()?;
        let status = child.wait()?;
        self.0 = None;
        Ok(was_running && status.signal() == Some(libc::SIGKILL))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What the child logged in one round.
struct RoundLog {
    ready: bool,
    ops: Vec<Op>,
    durable: HashSet<u64>,
}

fn read_lines(path: &Path) -> Vec<String> {
    match File::open(path) {
        Ok(f) => BufReader::new(f).lines().map(|l| l.expect("log line")).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("{}: {e}", path.display()),
    }
}

fn read_round_log(dir: &Path, round: u64) -> RoundLog {
    let mut log = RoundLog { ready: false, ops: Vec::new(), durable: HashSet::new() };
    for line in read_lines(&dir.join(format!("intent-{round}.log"))) {
        let f: Vec<&str> = line.split(' ').collect();
        match f.as_slice() {
            ["R"] => log.ready = true,
            ["I", gen, kind, offset, len] => log.ops.push(Op {
                gen: gen.parse().expect("gen"),
                kind: OpKind::from_letter(kind).expect("op kind"),
                offset: offset.parse().expect("offset"),
                len: len.parse().expect("len"),
            }),
            _ => panic!("malformed intent line {line:?}"),
        }
    }
    for line in read_lines(&dir.join(format!("durable-{round}.log"))) {
        let mut f = line.split(' ');
        assert_eq!(f.next(), Some("D"), "malformed durable line {line:?}");
        log.durable.extend(f.map(|g| g.parse::<u64>().expect("gen")));
    }
    let known: HashSet<u64> = log.ops.iter().map(|o| o.gen).collect();
    assert!(log.durable.is_subset(&known), "durable log names an operation the intent log lacks");
    log.ops.sort_by_key(|o| o.gen);
    log
}

fn wait_until_ready(guard: &mut ChildGuard, dir: &Path, round: u64, out: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let intent = dir.join(format!("intent-{round}.log"));
    loop {
        if read_lines(&intent).first().is_some_and(|l| l == "R") {
            return;
        }
        if let Some(status) = guard.child().try_wait().expect("try_wait") {
            panic!("round {round}: child exited ({status}) before it was ready:\n{}", tail(out));
        }
        assert!(Instant::now() < deadline, "round {round}: child not ready after 60 s:\n{}", tail(out));
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// `false` (after printing why the test skips) where the engine cannot run on a real file here.
fn real_file_store_possible(dir: &Path) -> bool {
    let probe = dir.join("probe.img");
    let r = syncblock_engine::uring::UringDevice::open(&probe, Some(1 << 20));
    let _ = std::fs::remove_file(&probe);
    match r {
        Ok(_) => true,
        Err(Error::UringUnavailable { cause }) => {
            println!("SKIP kill9: io_uring unavailable: {cause}");
            false
        }
        Err(Error::Io { what, source }) if source.raw_os_error() == Some(libc::EINVAL) => {
            println!("SKIP kill9: O_DIRECT unsupported in {}: {what}; set TMPDIR to ext4/xfs", dir.display());
            false
        }
        Err(e) => panic!("kill9: cannot create a store file in {}: {e}", dir.display()),
    }
}

/// The child's last progress line, as text.
fn last_stats(out: &Path) -> String {
    let text = std::fs::read_to_string(out).unwrap_or_default();
    match text.lines().rev().find_map(|l| l.strip_prefix("S ")) {
        Some(s) => {
            let f: Vec<&str> = s.split(' ').collect();
            format!("{} batches/{} syncs/{} checkpoints/{} segments cleaned", f[0], f[1], f[2], f[3])
        }
        None => "stats n/a".into(),
    }
}

/// Waits until no process holds the store file open, so that no write the dead child had in flight
/// can still land while we recover. A write lease is granted only when nobody else has the file
/// open, and an io_uring request keeps its file open until it completes (even after the process is
/// reaped, while the ring is torn down).
fn wait_until_file_released(path: &Path) {
    let f = File::open(path).expect("open store file");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // SAFETY: fcntl on a descriptor we own; F_SETLEASE takes an int argument.
        let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, libc::F_WRLCK) };
        if r == 0 {
            // SAFETY: as above.
            unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
            return;
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EAGAIN) {
            // Leases unsupported here: fall back to a grace period far longer than any I/O.
            eprintln!("kill9: cannot take a file lease ({e}); waiting 200 ms instead");
            std::thread::sleep(Duration::from_millis(200));
            return;
        }
        assert!(Instant::now() < deadline, "the killed child's store file is still open after 10 s");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn read_volume(rt: &tokio::runtime::Runtime, store: &Store) -> Vec<u8> {
    rt.block_on(async {
        let vol = store.volume(VOLUME_NAME).await.expect("volume after recovery");
        assert_eq!(vol.size_bytes, VOLUME_BYTES);
        let mut all = Vec::with_capacity(VOLUME_BYTES as usize);
        let chunk = 8 << 20;
        for offset in (0..VOLUME_BYTES).step_by(chunk as usize) {
            let got = store.read(vol.id, offset, chunk).await.unwrap_or_else(|e| panic!("read at {offset}: {e}"));
            all.extend_from_slice(&got);
        }
        all
    })
}

/// Checks every block of `observed` against the model; returns the descriptions of bad blocks.
fn verify(baseline: &[u8], observed: &[u8], log: &RoundLog) -> Vec<String> {
    let mut history: HashMap<u64, Vec<usize>> = HashMap::new();
    for (i, op) in log.ops.iter().enumerate() {
        for lba in op.lbas() {
            history.entry(lba).or_default().push(i);
        }
    }
    let mut bad = Vec::new();
    for lba in 0..VOLUME_BYTES / BLOCK_BYTES_U64 {
        let range = (lba * BLOCK_BYTES_U64) as usize..((lba + 1) * BLOCK_BYTES_U64) as usize;
        let (base, got) = (&baseline[range.clone()], &observed[range]);
        let ops: &[usize] = history.get(&lba).map(|v| v.as_slice()).unwrap_or(&[]);
        // States after 0..=n operations; the durable prefix must be included.
        let must = ops.iter().rposition(|i| log.durable.contains(&log.ops[*i].gen)).map_or(0, |p| p + 1);
        let mut state = base.to_vec();
        let mut matched = must == 0 && state == got;
        for (k, i) in ops.iter().enumerate() {
            log.ops[*i].apply(lba, &mut state);
            if k + 1 >= must && state == got {
                matched = true;
                break;
            }
        }
        if !matched {
            let desc: Vec<String> = ops
                .iter()
                .map(|i| {
                    let o = &log.ops[*i];
                    let d = if log.durable.contains(&o.gen) { " durable" } else { "" };
                    format!("{}{}@{}+{}{d}", o.kind.letter(), o.gen, o.offset, o.len)
                })
                .collect();
            let head = |b: &[u8]| {
                format!(
                    "gen {} lba {}",
                    u64::from_le_bytes(b[0..8].try_into().unwrap()),
                    u64::from_le_bytes(b[8..16].try_into().unwrap())
                )
            };
            bad.push(format!(
                "lba {lba}: content matches no allowed state (need >= {must} of {} ops); read [{}], baseline [{}], ops {desc:?}",
                ops.len(),
                head(got),
                head(base)
            ));
        }
    }
    bad
}

#[test]
fn store_survives_sigkill_under_load() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return; // Only the child workload runs in the child.
    }
    // An explicit round count (a soak) is honoured whatever it takes; the default is time-boxed.
    let (rounds, time_boxed) = match env_u64(ROUNDS_ENV) {
        Some(n) => (n, false),
        None => (ROUNDS_DEFAULT, true),
    };
    let seed = env_u64(SEED_ENV).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    println!("kill9: seed {seed} ({SEED_ENV}={seed} replays the schedule), {rounds} rounds");
    let mut rng = Rng::new(seed);
    let tmp = tempfile::Builder::new().prefix("syncblock-kill9-").tempdir().expect("tempdir");
    let dir = tmp.path().to_path_buf();
    if !real_file_store_possible(&dir) {
        return;
    }
    let store_path = dir.join("store.img");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut baseline = vec![0u8; VOLUME_BYTES as usize];
    let started = Instant::now();
    let (mut total_ops, mut total_durable, mut done) = (0usize, 0usize, 0u64);

    for round in 0..rounds {
        if time_boxed && round >= ROUNDS_MIN && started.elapsed() > TIME_BUDGET {
            println!("kill9: time budget spent after {round} rounds");
            break;
        }
        let round_started = Instant::now();
        let out_path = dir.join(format!("child-{round}.out"));
        let child = child_test_command(CHILD_TEST, File::create(&out_path).expect("child output"))
            .env(CHILD_ENV, &dir)
            .env(CHILD_ROUND_ENV, round.to_string())
            .env(CHILD_SEED_ENV, rng.next_u64().to_string())
            .spawn()
            .expect("spawning the child");
        let mut guard = ChildGuard(Some(child));

        // One round in five (never the first, which creates the store) is killed early, possibly
        // during recovery or before the first write.
        let early = round > 0 && rng.below(5) == 0;
        let delay_ms = if early {
            let d = rng.below(40);
            std::thread::sleep(Duration::from_millis(d));
            d
        } else {
            wait_until_ready(&mut guard, &dir, round, &out_path);
            let d = 100 + rng.below(1401);
            std::thread::sleep(Duration::from_millis(d));
            d
        };
        let was_running = guard.kill().expect("killing the child");
        assert!(was_running, "round {round}: the child died before it was killed:\n{}", tail(&out_path));
        wait_until_file_released(&store_path);

        let log = read_round_log(&dir, round);
        if !early {
            assert!(log.ready);
        }
        let store = match Store::open(&store_path, Config::default()) {
            Ok(s) => s,
            Err(e) => {
                let kept = tmp.keep();
                panic!(
                    "round {round} (seed {seed}): reopening after SIGKILL failed: {e}\n(image kept in {})",
                    kept.display()
                );
            }
        };
        let report = store.recovery_report().clone();
        let observed = read_volume(&rt, &store);
        store.close().expect("close");
        let bad = verify(&baseline, &observed, &log);
        if !bad.is_empty() {
            let kept = tmp.keep();
            panic!(
                "round {round} (seed {seed}): {} bad blocks after SIGKILL at {delay_ms} ms (image and logs kept in {}); recovery: {report:?}\n{}",
                bad.len(),
                kept.display(),
                bad.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
            );
        }
        println!(
            "kill9 round {round}: killed at {delay_ms} ms{}, {} ops ({} acknowledged durable), child engine {}, replayed {} records{}, {:.0} ms",
            if early { " (early)" } else { "" },
            log.ops.len(),
            log.durable.len(),
            last_stats(&out_path),
            report.records_replayed,
            if report.discarded_torn.is_some() { ", torn tail discarded" } else { "" },
            round_started.elapsed().as_secs_f64() * 1e3
        );
        total_ops += log.ops.len();
        total_durable += log.durable.len();
        baseline = observed;
        done += 1;
    }

    // The last recovery is stable: a second open sees the same contents.
    let store = Store::open(&store_path, Config::default()).expect("final reopen");
    let again = read_volume(&rt, &store);
    store.close().expect("close");
    assert!(again == baseline, "contents changed between two opens without writes");
    assert!(total_durable > 0, "no operation was ever acknowledged durable: the test tested nothing");
    println!(
        "kill9: {done} rounds, {total_ops} ops, {total_durable} acknowledged durable, {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
