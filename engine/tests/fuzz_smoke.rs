//! A stable-Rust run of the fuzz targets' properties (`fuzz/src/checks.rs`, included below), so that
//! every `cargo test` feeds each decoder and the open-a-corrupted-store path thousands of inputs:
//! random bytes and, mostly, valid encodings mutated a little, the inputs that reach deepest.
//! Coverage-guided fuzzing (`fuzz/run-smoke.sh`, cargo-fuzz) goes further; this catches regressions.
//!
//! As under libFuzzer, any panic, including one on the engine's thread, aborts the process; the hook
//! first prints the failing input and saves it where `cargo fuzz run <target> <file>` can replay it.
//! `SYNCBLOCK_FUZZ_SMOKE_CASES` scales the number of cases (default 20000 per decoder).

#[path = "../../fuzz/src/checks.rs"]
#[allow(dead_code)]
mod checks;

use std::cell::RefCell;
use std::sync::{Mutex, Once};

use checks::{Input, REPAIR_CRC, REPAIR_MAGIC, REPAIR_STORE, STORE_ID};
use syncblock_engine::format::{
    CheckpointHeader, Entry, EntryKind, MetaOp, RecordHeader, RecordKind, SegmentHeader, Superblock, BATCH_BLOCKS_MAX,
};
use syncblock_engine::sim::Rng;
use syncblock_engine::{Lba, Lsn, VolumeId, BLOCK_BYTES};

const CASES_DEFAULT: u64 = 20_000;

fn cases() -> u64 {
    std::env::var("SYNCBLOCK_FUZZ_SMOKE_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(CASES_DEFAULT)
}

thread_local! {
    /// The input the current thread is checking: (target, bytes).
    static CURRENT: RefCell<Option<(&'static str, Vec<u8>)>> = const { RefCell::new(None) };
}
/// The input being opened by `open_corrupted`, whose panics may happen on the engine's thread.
static CURRENT_OPEN: Mutex<Option<Vec<u8>>> = Mutex::new(None);

fn install_abort_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default(info);
            let case = CURRENT.with(|c| c.borrow().clone()).or_else(|| {
                CURRENT_OPEN.try_lock().ok().and_then(|g| g.clone()).map(|b| ("open_corrupted", b))
            });
            if let Some((target, bytes)) = case {
                let path = std::env::temp_dir().join(format!("syncblock-fuzz-smoke-{target}.bin"));
                let _ = std::fs::write(&path, &bytes);
                eprintln!(
                    "fuzz smoke: target {target} failed on {} input bytes, saved to {} (replay: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run {target} {})",
                    bytes.len(),
                    path.display(),
                    path.display()
                );
            }
            std::process::abort();
        }));
    });
}

/// Runs `target`'s check on `input`, remembering the input for the panic hook.
fn run(name: &'static str, target: fn(&[u8]), input: Vec<u8>) {
    CURRENT.with(|c| *c.borrow_mut() = Some((name, input)));
    CURRENT.with(|c| target(&c.borrow().as_ref().expect("input").1));
    CURRENT.with(|c| *c.borrow_mut() = None);
}

fn random_bytes(rng: &mut Rng, max_len: u64) -> Vec<u8> {
    let n = rng.below(max_len + 1) as usize;
    (0..n).map(|_| rng.next_u64() as u8).collect()
}

/// `max_len` random bytes at most, after a random mode byte.
fn random_input(rng: &mut Rng, max_len: u64) -> Vec<u8> {
    let mut b = random_bytes(rng, max_len);
    b.insert(0, rng.next_u64() as u8);
    b
}

/// The mode byte `mode`, then `body`: a target's input.
fn with_mode(mode: u8, body: Vec<u8>) -> Vec<u8> {
    let mut b = vec![mode];
    b.extend(body);
    b
}

/// A mode byte: the selector `sel` in the low bits, repair bits at random (most often all three,
/// which reaches furthest).
fn mode(rng: &mut Rng, sel: u8) -> u8 {
    let repairs = match rng.below(4) {
        0 => 0,
        1 => (rng.next_u64() as u8) & (REPAIR_MAGIC | REPAIR_STORE | REPAIR_CRC),
        _ => REPAIR_MAGIC | REPAIR_STORE | REPAIR_CRC,
    };
    sel | repairs
}

/// A few random mutations (overwrite, bit flip, 4-byte overwrite, truncate, extend) of `bytes`.
fn mutated(rng: &mut Rng, mut bytes: Vec<u8>) -> Vec<u8> {
    let mut ops = Vec::new();
    for _ in 0..1 + rng.below(4) {
        // Mostly near the front, where the fixed fields are.
        let at = if rng.below(2) == 0 { rng.below(128) } else { rng.below(bytes.len().max(1) as u64) } as u16;
        ops.extend_from_slice(&at.to_le_bytes());
        let op = match rng.below(10) {
            0 => 3,
            1 => 4,
            2 | 3 => 2,
            4..=6 => 1,
            _ => 0,
        };
        ops.push(op);
        ops.extend_from_slice(&rng.next_u64().to_le_bytes()[..if op == 4 { 8 } else { 4 }]);
    }
    checks::mutate(&mut bytes, &mut Input::new(&ops));
    bytes
}

fn random_record(rng: &mut Rng) -> RecordHeader {
    let meta = rng.below(4) == 0;
    if meta {
        let op = random_meta(rng);
        return RecordHeader {
            kind: RecordKind::Meta,
            lsn: Lsn(rng.next_u64() >> 8),
            durable_lsn: Lsn(rng.next_u64() >> 8),
            segment_seq: rng.below(1000),
            entries: vec![],
            crcs: vec![],
            meta: op.encode(),
        };
    }
    let mut entries = Vec::new();
    let mut crcs = Vec::new();
    for _ in 0..1 + rng.below(8) {
        let kind = [EntryKind::Write, EntryKind::Trim, EntryKind::Copy][rng.below(3) as usize];
        let n_blocks = if kind.has_data() {
            (1 + rng.below(16)).min(BATCH_BLOCKS_MAX as u64 - crcs.len() as u64) as u32
        } else {
            1 + rng.below(1 << 20) as u32
        };
        if n_blocks == 0 {
            break;
        }
        if kind.has_data() {
            crcs.extend((0..n_blocks).map(|_| rng.next_u64() as u32));
        }
        entries.push(Entry {
            volume: VolumeId(rng.below(5) as u32),
            kind,
            lba: Lba(rng.below(1 << 30)),
            n_blocks,
            data_lsn: Lsn(rng.below(1 << 40)),
            old_phys: if kind == EntryKind::Copy { rng.next_u64() as u32 } else { 0 },
            tag: rng.next_u64(),
            resync: rng.below(2) == 1,
        });
    }
    RecordHeader {
        kind: RecordKind::Data,
        lsn: Lsn(rng.below(1 << 40)),
        durable_lsn: Lsn(rng.below(1 << 40)),
        segment_seq: rng.below(1000),
        entries,
        crcs,
        meta: vec![],
    }
}

fn random_meta(rng: &mut Rng) -> MetaOp {
    let volume = VolumeId(rng.below(100) as u32);
    match rng.below(3) {
        0 => {
            let n = 1 + rng.below(64) as usize;
            let name: String = (0..n).map(|_| (b'a' + rng.below(26) as u8) as char).collect();
            MetaOp::Create { volume, size_bytes: rng.next_u64(), name }
        }
        1 => MetaOp::Resize { volume, size_bytes: rng.next_u64() },
        _ => MetaOp::Delete { volume },
    }
}

fn random_checkpoint_header(rng: &mut Rng) -> CheckpointHeader {
    CheckpointHeader {
        store_id: STORE_ID,
        seq: rng.below(100),
        next_lsn: Lsn(rng.below(1 << 40)),
        next_segment_seq: rng.below(1000),
        tail_segment: rng.next_u64() as u32,
        tail_block: rng.below(4096) as u32,
        tail_seq: rng.below(1000),
        payload_bytes: rng.below(1 << 20),
        payload_crc: rng.next_u64() as u32,
    }
}

fn encode_record(rec: &RecordHeader) -> Vec<u8> {
    let mut b = vec![0u8; rec.header_blocks() as usize * BLOCK_BYTES];
    rec.encode_into(&mut b, STORE_ID);
    b
}

fn image_superblock() -> Superblock {
    Superblock::decode(&checks::image().bytes[..BLOCK_BYTES]).expect("image superblock")
}

#[test]
fn record_header_decoder_survives_random_and_mutated_input() {
    install_abort_hook();
    let mut rng = Rng::new(0x7265_636f_7264);
    for case in 0..cases() {
        let input = if case % 8 == 0 {
            random_input(&mut rng, 2 * BLOCK_BYTES as u64)
        } else {
            let mode = mode(&mut rng, 0);
            let valid = encode_record(&random_record(&mut rng));
            with_mode(mode, mutated(&mut rng, valid))
        };
        run("record_header", checks::record_header, input);
    }
}

#[test]
fn checkpoint_decoders_survive_random_and_mutated_input() {
    install_abort_hook();
    let mut rng = Rng::new(0x636b_7074);
    for case in 0..cases() {
        let input = match case % 4 {
            // Slot header, mutated.
            0 => {
                let h = random_checkpoint_header(&mut rng);
                with_mode(mode(&mut rng, 0), mutated(&mut rng, h.encode()[..128].to_vec()))
            }
            // A real payload, mutated.
            1 => {
                let seed_bytes = random_bytes(&mut rng, 200);
                let data = checks::arbitrary_checkpoint(&mut Input::new(&seed_bytes));
                with_mode(1, mutated(&mut rng, data.to_bytes()))
            }
            // Built and mutated inside the target.
            2 => with_mode(2, random_bytes(&mut rng, 400)),
            _ => random_input(&mut rng, 600),
        };
        run("checkpoint", checks::checkpoint, input);
    }
}

#[test]
fn superblock_segment_and_meta_decoders_survive_random_and_mutated_input() {
    install_abort_hook();
    let sb = image_superblock();
    let mut rng = Rng::new(0x73_7570_6572);
    for case in 0..cases() {
        let input = match case % 4 {
            0 => with_mode(mode(&mut rng, 0), mutated(&mut rng, sb.encode()[..128].to_vec())),
            1 => {
                let h = SegmentHeader {
                    store_id: STORE_ID,
                    seq: rng.below(1000),
                    segment: rng.below(64) as u32,
                    first_lsn: Lsn(rng.below(1 << 40)),
                };
                let mut block = [0u8; BLOCK_BYTES];
                h.encode_into(&mut block);
                with_mode(mode(&mut rng, 1), mutated(&mut rng, block[..128].to_vec()))
            }
            2 => {
                let valid = random_meta(&mut rng).encode();
                with_mode(2, mutated(&mut rng, valid))
            }
            _ => random_input(&mut rng, 300),
        };
        run("superblock", checks::superblock, input);
    }
}

#[test]
fn opening_a_corrupted_store_never_panics() {
    install_abort_hook();
    let image = checks::image();
    let mut rng = Rng::new(0x6f70_656e);
    // Each case opens a store (recovery, a checkpoint write, an engine thread): far costlier than
    // a decode, so fewer cases.
    let n_cases = (cases() / 20).max(1);
    for _ in 0..n_cases {
        // Half the cases re-seal the checksums after corrupting (see `checks::reseal`).
        let mut input = vec![rng.below(2) as u8];
        for _ in 0..1 + rng.below(3) {
            // Mostly in used blocks, where the structures are.
            let block = if rng.below(4) == 0 {
                rng.next_u64() as u16 & 0x7fff
            } else {
                0x8000 | rng.below(image.used_blocks.len() as u64) as u16
            };
            // Mostly in the first bytes of the block, where headers keep their fields.
            let at = if rng.below(2) == 0 { rng.below(128) } else { rng.below(BLOCK_BYTES as u64) } as u16;
            let len = rng.below(8) as u8;
            input.extend_from_slice(&block.to_le_bytes());
            input.extend_from_slice(&at.to_le_bytes());
            input.push(len);
            input.extend((0..=len).map(|_| rng.next_u64() as u8));
        }
        *CURRENT_OPEN.lock().unwrap() = Some(input.clone());
        run("open_corrupted", checks::open_corrupted, input);
        *CURRENT_OPEN.lock().unwrap() = None;
    }
}

/// The repair modes rely on field offsets copied from `format.rs`: if they drift, repaired inputs
/// stop decoding and the fuzzers silently lose their reach.
#[test]
fn repairs_still_match_the_format() {
    let all = REPAIR_MAGIC | REPAIR_STORE | REPAIR_CRC;
    let mut rng = Rng::new(1);

    let rec = random_record(&mut rng);
    let mut b = encode_record(&rec);
    b[8] ^= 1; // The LSN.
    b[48..56].fill(0); // The store id.
    assert!(RecordHeader::decode(&b, STORE_ID).is_err());
    checks::repair_record(&mut b, all);
    assert_eq!(RecordHeader::decode(&b, STORE_ID).map(|r| r.lsn), Ok(Lsn(rec.lsn.0 ^ 1)));

    let sb = image_superblock();
    let mut b = sb.encode().to_vec();
    b[0] = 0;
    b[16] ^= 1; // The store id.
    checks::repair_superblock(&mut b, all);
    assert_eq!(Superblock::decode(&b).map(|s| s.store_id), Ok(sb.store_id ^ 1));

    let h = SegmentHeader { store_id: 9, seq: 5, segment: 2, first_lsn: Lsn(7) };
    let mut b = [0u8; BLOCK_BYTES];
    h.encode_into(&mut b);
    checks::repair_segment_header(&mut b, all);
    assert_eq!(SegmentHeader::decode(&b, STORE_ID), Ok(SegmentHeader { store_id: STORE_ID, ..h }));

    let image = checks::image();
    let mut b = image.bytes.clone();
    checks::reseal(&mut b, &image.superblock);
    assert!(b == image.bytes, "re-sealing an intact image changed it: a checksum is computed wrongly");

    let ck = CheckpointHeader { store_id: 9, ..random_checkpoint_header(&mut rng) };
    let mut b = ck.encode().to_vec();
    checks::repair_checkpoint_header(&mut b, all);
    assert_eq!(CheckpointHeader::decode(&b, STORE_ID), Ok(CheckpointHeader { store_id: STORE_ID, ..ck }));
}
