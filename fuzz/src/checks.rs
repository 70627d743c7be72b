//! The properties the fuzz targets check, one public function per target. Each takes arbitrary
//! bytes and must return normally: a panic in it, or in the engine thread it starts, is a bug
//! (libFuzzer's panic hook, and the smoke test's, turn every panic into an abort).
//!
//! This file is shared: `fuzz/src/lib.rs` uses it for the cargo-fuzz targets and
//! `engine/tests/fuzz_smoke.rs` includes it for a stable-Rust run of the same properties. It may use
//! only crates both have: `syncblock_engine`, `bytes`, `crc32fast` and `tokio`.
//!
//! Input formats. The first byte selects a mode; in "repair" modes the harness rewrites the magic,
//! version, store id and CRC fields of the structure before decoding, so that the fuzzer reaches the
//! structural checks behind the checksum instead of stopping at it.

use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use syncblock_engine::buf::AlignedBuf;
use syncblock_engine::checkpoint::{CheckpointData, RunRec, SegmentRec, VolumeRec};
use syncblock_engine::format::{
    CheckpointHeader, MetaOp, RecordHeader, RecordKind, SegmentHeader, Superblock, CHECKPOINT_MAGIC, FORMAT_VERSION,
    HEADER_BLOCKS_MAX, RECORD_MAGIC, SEGMENT_MAGIC, SUPERBLOCK_MAGIC,
};
use syncblock_engine::sim::{Rng, SimDevice, SimDisk};
use syncblock_engine::{Config, Error, Store, BLOCK_BYTES, SEGMENT_BYTES_MIN};

/// The store id the decoders are asked to accept (and the one the repair modes write).
pub const STORE_ID: u64 = 0x5eed_f022_0000_0001;

/// Field offsets from `engine/src/format.rs` (drawn in `docs/format.md`), used only by the repair
/// modes. If the format moves a field, repairs stop producing decodable structures: the smoke test's
/// `repairs_still_match_the_format` catches that.
pub mod layout {
    pub const REC_MAGIC: usize = 0;
    pub const REC_VERSION: usize = 4;
    pub const REC_HEADER_BLOCKS: usize = 32;
    pub const REC_STORE: usize = 48;
    pub const REC_CRC: usize = 56;
    pub const REC_ENTRIES: usize = 64;
    pub const REC_ENTRY_BYTES: usize = 40;
    pub const SB_VERSION: usize = 8;
    pub const SB_BLOCK_BYTES: usize = 12;
    pub const SB_CRC: usize = 72;
    pub const SB_CRC_END: usize = 76;
    pub const SEG_VERSION: usize = 4;
    pub const SEG_STORE: usize = 8;
    pub const SEG_CRC: usize = 40;
    pub const SEG_CRC_END: usize = 44;
    pub const CK_VERSION: usize = 4;
    pub const CK_STORE: usize = 8;
    pub const CK_PAYLOAD_BYTES: usize = 40;
    pub const CK_PAYLOAD_CRC: usize = 52;
    pub const CK_CRC: usize = 72;
    pub const CK_CRC_END: usize = 80;
}

/// Mode-byte bits of the repair modes.
pub const REPAIR_MAGIC: u8 = 0x10;
pub const REPAIR_STORE: u8 = 0x20;
pub const REPAIR_CRC: u8 = 0x40;

/// Writes a field's bytes (`v.to_le_bytes()`: every integer on disk is little-endian) at `at`.
fn put(b: &mut [u8], at: usize, bytes: &[u8]) {
    b[at..at + bytes.len()].copy_from_slice(bytes);
}
fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

use syncblock_engine::format::crc_skipping;

/// Reads fuzzer bytes as numbers; past the end it yields zeros.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Input<'a> {
        Input { data }
    }
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.data.split_at(n.min(self.data.len()));
        self.data = tail;
        head
    }
    fn fill<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let b = self.bytes(N);
        a[..b.len()].copy_from_slice(b);
        a
    }
    pub fn u8(&mut self) -> u8 {
        self.fill::<1>()[0]
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.fill())
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.fill())
    }
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.fill())
    }
}

// ---------------------------------------------------------------------------------------------
// record_header

/// `record_header` target. Mode byte: without repair bits, the rest is decoded as it is (any
/// length); with any, it is copied into a zeroed buffer of [`HEADER_BLOCKS_MAX`] blocks and the
/// chosen fields are repaired. Property: decoding never panics, and a decoded header re-encodes to
/// bytes that decode to the same header.
pub fn record_header(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode & (REPAIR_MAGIC | REPAIR_STORE | REPAIR_CRC) == 0 {
        check_record(rest);
        return;
    }
    let mut b = vec![0u8; HEADER_BLOCKS_MAX as usize * BLOCK_BYTES];
    let n = rest.len().min(b.len());
    b[..n].copy_from_slice(&rest[..n]);
    repair_record(&mut b, mode);
    check_record(&b);
}

/// Repairs the fields that open a segment, record or checkpoint header, as `mode` asks: the magic
/// (u32 at 0) and format version (u16 at `version_at`), and the store id (u64 at `store_at`).
fn repair_magic_and_store(b: &mut [u8], mode: u8, magic: u32, version_at: usize, store_at: usize) {
    if mode & REPAIR_MAGIC != 0 {
        put(b, 0, &magic.to_le_bytes());
        put(b, version_at, &(FORMAT_VERSION as u16).to_le_bytes());
    }
    if mode & REPAIR_STORE != 0 {
        put(b, store_at, &STORE_ID.to_le_bytes());
    }
}

/// Re-seals a structure's CRC (u32 at `crc_at`, over `b[..crc_end]`) if `mode` asks.
fn repair_crc(b: &mut [u8], mode: u8, crc_at: usize, crc_end: usize) {
    if mode & REPAIR_CRC != 0 {
        let crc = crc_skipping(&b[..crc_end], crc_at);
        put(b, crc_at, &crc.to_le_bytes());
    }
}

/// Applies the repairs `mode` asks for to a record header at the start of `b`.
pub fn repair_record(b: &mut [u8], mode: u8) {
    use layout::*;
    repair_magic_and_store(b, mode, RECORD_MAGIC, REC_VERSION, REC_STORE);
    // The CRC covers the whole header, as many blocks as it says it has.
    if mode & REPAIR_CRC != 0 {
        let header_blocks = get_u32(b, REC_HEADER_BLOCKS) as usize;
        if (1..=HEADER_BLOCKS_MAX as usize).contains(&header_blocks) && header_blocks * BLOCK_BYTES <= b.len() {
            let crc = crc_skipping(&b[..header_blocks * BLOCK_BYTES], REC_CRC);
            put(b, REC_CRC, &crc.to_le_bytes());
        }
    }
}

fn check_record(b: &[u8]) {
    let Ok(rec) = RecordHeader::decode(b, STORE_ID) else { return };
    let header_blocks = rec.header_blocks();
    assert!((1..=HEADER_BLOCKS_MAX).contains(&header_blocks), "decoded header claims {header_blocks} blocks");
    let data_blocks: u64 = rec.entries.iter().filter(|e| e.kind.has_data()).map(|e| e.n_blocks as u64).sum();
    assert_eq!(data_blocks, rec.crcs.len() as u64, "entries and CRCs disagree in a decoded header");
    assert!(rec.entries.iter().all(|e| e.n_blocks > 0 && e.lba.0.checked_add(e.n_blocks as u64).is_some()));
    let mut out = vec![0u8; header_blocks as usize * BLOCK_BYTES];
    rec.encode_into(&mut out, STORE_ID);
    let again = RecordHeader::decode(&out, STORE_ID).expect("a re-encoded record header decodes");
    assert_eq!(again, rec, "decode(encode(header)) differs from header");
    if rec.kind == RecordKind::Meta {
        check_meta(&rec.meta);
    }
}

// ---------------------------------------------------------------------------------------------
// checkpoint

/// `checkpoint` target. Mode byte % 3: 0, the rest is a checkpoint slot header (repairs as the
/// mode's bits say); 1, the rest is an rkyv payload; 2, the rest builds a [`CheckpointData`] which is
/// serialised, then mutated by the remaining bytes. Payloads are decoded from block-aligned memory,
/// as recovery does. Property: no panic; whatever decodes re-encodes to itself.
pub fn checkpoint(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 3 {
        0 => {
            let mut b = rest.to_vec();
            if mode & (REPAIR_MAGIC | REPAIR_STORE | REPAIR_CRC) != 0 {
                b.resize(b.len().max(BLOCK_BYTES), 0);
                repair_checkpoint_header(&mut b, mode);
            }
            if let Ok(h) = CheckpointHeader::decode(&b, STORE_ID) {
                assert_eq!(CheckpointHeader::decode(&h.encode(), STORE_ID), Ok(h), "checkpoint header round trip");
            }
        }
        1 => check_payload(rest),
        _ => {
            let mut input = Input::new(rest);
            let data = arbitrary_checkpoint(&mut input);
            let mut bytes = data.to_bytes();
            assert_eq!(decode_payload(&bytes).as_ref(), Ok(&data), "a serialised checkpoint does not decode to itself");
            mutate(&mut bytes, &mut input);
            check_payload(&bytes);
        }
    }
}

pub fn repair_checkpoint_header(b: &mut [u8], mode: u8) {
    use layout::*;
    repair_magic_and_store(b, mode, CHECKPOINT_MAGIC, CK_VERSION, CK_STORE);
    repair_crc(b, mode, CK_CRC, CK_CRC_END);
}

/// Decodes a payload from block-aligned memory, as recovery does (rkyv wants 16-byte alignment).
pub fn decode_payload(bytes: &[u8]) -> Result<CheckpointData, String> {
    let mut buf = AlignedBuf::zeroed(bytes.len().div_ceil(BLOCK_BYTES));
    buf[..bytes.len()].copy_from_slice(bytes);
    CheckpointData::from_bytes(&buf[..bytes.len()])
}

fn check_payload(bytes: &[u8]) {
    if let Ok(data) = decode_payload(bytes) {
        let again = decode_payload(&data.to_bytes()).expect("a re-serialised checkpoint decodes");
        assert_eq!(again, data, "checkpoint payload round trip");
    }
}

/// A small checkpoint built from fuzzer bytes.
pub fn arbitrary_checkpoint(input: &mut Input) -> CheckpointData {
    let next_volume_id = input.u32();
    let volumes = (0..input.u8() % 4)
        .map(|_| {
            let id = input.u32();
            let n = (input.u8() % 16) as usize;
            let name = String::from_utf8_lossy(input.bytes(n)).into_owned();
            let size_bytes = input.u64();
            let (last_tag, trim_floor) = (input.u64(), input.u64());
            let n = (input.u8() % 16) as usize;
            let attr = input.bytes(n).to_vec();
            let staged = (0..input.u8() % 3).map(|_| (input.u64(), input.u64())).collect();
            let staged_trims = (0..input.u8() % 3).map(|_| (input.u64(), input.u64())).collect();
            let resync_overflowed = input.u8() % 2 == 1;
            VolumeRec { id, name, size_bytes, last_tag, trim_floor, attr, staged, staged_trims, resync_overflowed }
        })
        .collect();
    let segments = (0..input.u8() % 8)
        .map(|_| SegmentRec {
            seq: input.u64(),
            used_blocks: input.u32(),
            min_data_lsn: input.u64(),
            max_data_lsn: input.u64(),
            max_lsn: input.u64(),
            trim_tags: (0..input.u8() % 3).map(|_| (input.u32(), input.u64())).collect(),
        })
        .collect();
    let runs =
        (0..input.u8() % 8).map(|_| RunRec { volume: input.u32(), n_blocks: input.u32(), lba: input.u64() }).collect();
    let entries = (0..input.u8() % 16).map(|_| input.u64()).collect();
    CheckpointData { next_volume_id, volumes, segments, runs, entries }
}

/// Overwrites, flips, truncates or extends `bytes` as the remaining input says.
pub fn mutate(bytes: &mut Vec<u8>, input: &mut Input) {
    while !input.is_empty() {
        if bytes.is_empty() {
            bytes.push(input.u8());
            continue;
        }
        let at = input.u16() as usize % bytes.len();
        match input.u8() % 5 {
            0 => bytes[at] = input.u8(),
            1 => bytes[at] ^= 1 << (input.u8() % 8),
            2 => {
                let v = input.u32().to_le_bytes();
                let end = (at + 4).min(bytes.len());
                bytes[at..end].copy_from_slice(&v[..end - at]);
            }
            3 => bytes.truncate(at),
            _ => bytes.extend_from_slice(input.bytes(8)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// superblock

/// `superblock` target. Mode byte % 3: 0, the rest is a superblock (in repair modes, padded to a
/// block and repaired); 1, a segment header (likewise); 2, a volume-table operation. Property: no
/// panic; decoded values re-encode to themselves; a decoded superblock's geometry fits its device.
pub fn superblock(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let repair = mode & (REPAIR_MAGIC | REPAIR_STORE | REPAIR_CRC) != 0;
    let mut b = rest.to_vec();
    if repair {
        b.resize(b.len().max(BLOCK_BYTES), 0);
    }
    match mode % 3 {
        0 => {
            if repair {
                repair_superblock(&mut b, mode);
            }
            if let Ok(sb) = Superblock::decode(&b) {
                check_superblock(&sb);
            }
        }
        1 => {
            if repair {
                repair_segment_header(&mut b, mode);
            }
            if let Ok(h) = SegmentHeader::decode(&b, STORE_ID) {
                let mut out = [0u8; BLOCK_BYTES];
                h.encode_into(&mut out);
                assert_eq!(SegmentHeader::decode(&out, STORE_ID), Ok(h), "segment header round trip");
            }
        }
        _ => check_meta(rest),
    }
}

pub fn repair_superblock(b: &mut [u8], mode: u8) {
    use layout::*;
    if mode & REPAIR_MAGIC != 0 {
        put(b, 0, &SUPERBLOCK_MAGIC);
        put(b, SB_VERSION, &FORMAT_VERSION.to_le_bytes());
        put(b, SB_BLOCK_BYTES, &(BLOCK_BYTES as u32).to_le_bytes());
    }
    repair_crc(b, mode, SB_CRC, SB_CRC_END);
}

pub fn repair_segment_header(b: &mut [u8], mode: u8) {
    use layout::*;
    repair_magic_and_store(b, mode, SEGMENT_MAGIC, SEG_VERSION, SEG_STORE);
    repair_crc(b, mode, SEG_CRC, SEG_CRC_END);
}

/// What `Superblock::decode` promises: the geometry can be used for offset arithmetic safely.
fn check_superblock(sb: &Superblock) {
    assert_eq!(Superblock::decode(&sb.encode()), Ok(*sb), "superblock round trip");
    let bb = BLOCK_BYTES as u64;
    assert!(sb.n_segments > 0 && sb.segment_blocks > 0);
    let last_end = sb
        .segment_offset(sb.n_segments - 1)
        .checked_add(sb.segment_blocks as u64 * bb)
        .expect("segment area end overflows");
    assert!(last_end <= sb.device_bytes, "segments end at {last_end}, past the device's {} bytes", sb.device_bytes);
    for offset in sb.checkpoint_offsets {
        let end =
            sb.checkpoint_slot_blocks.checked_mul(bb).and_then(|n| offset.checked_add(n)).expect("slot end overflows");
        assert!(
            offset >= 2 * bb && end <= sb.data_offset,
            "checkpoint slot {offset}..{end} overlaps the superblock or the data"
        );
    }
}

fn check_meta(b: &[u8]) {
    if let Ok(op) = MetaOp::decode(b) {
        if let MetaOp::Create { name, .. } = &op {
            assert!(name.len() <= syncblock_engine::format::NAME_BYTES_MAX);
        }
        assert_eq!(MetaOp::decode(&op.encode()).as_ref(), Ok(&op), "volume-table op round trip");
    }
}

// ---------------------------------------------------------------------------------------------
// open_corrupted

/// Size of the store image the `open_corrupted` target corrupts: 2 MiB holds the two checkpoint
/// slots (sized for 4096 volumes) and 19 segments of 64 KiB.
pub const IMAGE_BYTES: usize = 2 << 20;
const IMAGE_VOLUME: &str = "fz";
const IMAGE_VOLUME_BYTES: u64 = 64 * BLOCK_BYTES as u64;
/// Longest any one engine call may take on the simulated device before it counts as a hang.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A store image with a volume, data written in several records, a checkpoint and log records after
/// it (so that opening it replays the log), and the blocks that hold anything.
pub struct Image {
    pub bytes: Vec<u8>,
    /// The image's geometry, uncorrupted.
    pub superblock: Superblock,
    /// Indexes of the image's non-zero blocks: where corruption is interesting.
    pub used_blocks: Vec<u32>,
}

/// Built once per process; deterministic (the random store id is replaced by [`STORE_ID`]), so a
/// crashing input reproduces in another process.
pub fn image() -> &'static Image {
    static IMAGE: OnceLock<Image> = OnceLock::new();
    IMAGE.get_or_init(build_image)
}

/// Deterministic content for block `lba` written by step `step`.
fn block_pattern(lba: u64, step: u64) -> Vec<u8> {
    let mut rng = Rng::new(lba << 32 | step);
    (0..BLOCK_BYTES / 8).flat_map(|_| rng.next_u64().to_le_bytes()).collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_time().build().expect("tokio runtime")
}

fn build_image() -> Image {
    let disk = SimDisk::formatted(IMAGE_BYTES, SEGMENT_BYTES_MIN).expect("formatting the fuzz image");
    let store = Store::open_device(Box::new(SimDevice::new(disk.clone())), Config::default(), "fuzz-image")
        .expect("opening the fuzz image");
    let rt = runtime();
    let mut expect = vec![0u8; IMAGE_VOLUME_BYTES as usize];
    rt.block_on(async {
        let vol = store.create_volume(IMAGE_VOLUME, IMAGE_VOLUME_BYTES).await.expect("create volume");
        for step in 0..16u64 {
            let lba = step * 7 % 60;
            let n = 1 + step % 4;
            let mut data = Vec::new();
            for i in 0..n {
                data.extend(block_pattern(lba + i, step));
            }
            let at = (lba as usize) * BLOCK_BYTES;
            expect[at..at + data.len()].copy_from_slice(&data);
            store.write(vol.id, lba * BLOCK_BYTES as u64, Bytes::from(data), step % 5 == 0).await.expect("write");
            match step {
                3 | 11 => store.flush().await.expect("flush"),
                7 => store.checkpoint().await.expect("checkpoint"),
                9 => {
                    store.trim(vol.id, 40 * BLOCK_BYTES as u64, 3 * BLOCK_BYTES as u64).await.expect("trim");
                    expect[40 * BLOCK_BYTES..43 * BLOCK_BYTES].fill(0);
                }
                _ => {}
            }
        }
        // An unaligned write, left unflushed: the log's tail.
        store.write(vol.id, 1000, Bytes::from(vec![0xab; 5000]), false).await.expect("write");
        expect[1000..6000].fill(0xab);
    });
    let mut bytes = disk.lock().expect("sim disk").written.clone();
    store.close().expect("closing the fuzz image");
    set_store_id(&mut bytes, STORE_ID);

    // The uncorrupted image must open and read back exactly what was written.
    let store =
        Store::open_device(Box::new(SimDevice::new(SimDisk::new(bytes.clone()))), Config::default(), "fuzz-image")
            .expect("the uncorrupted fuzz image does not open");
    let got = rt.block_on(async {
        let vol = store.volume(IMAGE_VOLUME).await.expect("volume");
        store.read(vol.id, 0, IMAGE_VOLUME_BYTES).await.expect("read")
    });
    assert!(got[..] == expect[..], "the uncorrupted fuzz image reads back wrong");
    store.close().expect("close");

    let used_blocks = (0..IMAGE_BYTES / BLOCK_BYTES)
        .filter(|b| bytes[b * BLOCK_BYTES..(b + 1) * BLOCK_BYTES].iter().any(|x| *x != 0))
        .map(|b| b as u32)
        .collect();
    let superblock = Superblock::decode(&bytes[..BLOCK_BYTES]).expect("superblock");
    Image { bytes, superblock, used_blocks }
}

/// Rewrites every structure in `image` that carries the store id (superblocks, checkpoint slot
/// headers, segment and record headers) to carry `store_id`, re-sealing each with its CRC.
fn set_store_id(image: &mut [u8], store_id: u64) {
    let sb = Superblock::decode(&image[..BLOCK_BYTES]).expect("superblock");
    let old = sb.store_id;
    let sb = Superblock { store_id, ..sb };
    for copy in 0..2 {
        image[copy * BLOCK_BYTES..(copy + 1) * BLOCK_BYTES].copy_from_slice(&sb.encode());
    }
    for offset in sb.checkpoint_offsets {
        let at = offset as usize;
        if let Ok(h) = CheckpointHeader::decode(&image[at..at + BLOCK_BYTES], old) {
            image[at..at + BLOCK_BYTES].copy_from_slice(&CheckpointHeader { store_id, ..h }.encode());
        }
    }
    let segment_bytes = sb.segment_blocks as usize * BLOCK_BYTES;
    for s in 0..sb.n_segments {
        let start = sb.segment_offset(s) as usize;
        let seg = &mut image[start..start + segment_bytes];
        let Ok(h) = SegmentHeader::decode(&seg[..BLOCK_BYTES], old) else { continue };
        SegmentHeader { store_id, ..h }.encode_into(&mut seg[..BLOCK_BYTES]);
        let mut cursor = 1usize;
        while cursor < sb.segment_blocks as usize {
            let Ok(rec) = RecordHeader::decode(&seg[cursor * BLOCK_BYTES..], old) else { break };
            let len = rec.header_blocks() as usize * BLOCK_BYTES;
            rec.encode_into(&mut seg[cursor * BLOCK_BYTES..cursor * BLOCK_BYTES + len], store_id);
            cursor += (rec.header_blocks() + rec.data_blocks()) as usize;
        }
    }
}

/// `open_corrupted` target. Input: a mode byte, then a list of overwrites of the [`image`], each
/// `block: u16, at: u16, len: u8, bytes` (with the block's top bit set, it indexes the image's used
/// blocks, otherwise any block). With the mode's low bit set, every structure is then re-sealed
/// ([`reseal`]): its checksums made to match, so the corruption is one the checksums cannot see
/// (as a bug that wrote wrong metadata would leave) and recovery's semantic checks must catch it.
/// The image is opened (an error is fine); if it opens, every volume's blocks are read (errors are
/// fine) and the store is closed. Property: no panic, no hang, and the engine thread stays alive.
pub fn open_corrupted(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let image = image();
    let mut bytes = image.bytes.clone();
    let n_blocks = IMAGE_BYTES / BLOCK_BYTES;
    let mut input = Input::new(rest);
    while !input.is_empty() {
        let block = input.u16();
        let block = if block & 0x8000 != 0 {
            image.used_blocks[(block & 0x7fff) as usize % image.used_blocks.len()] as usize
        } else {
            block as usize % n_blocks
        };
        let at = block * BLOCK_BYTES + input.u16() as usize % BLOCK_BYTES;
        let len = 1 + input.u8() as usize % 64;
        let src = input.bytes(len);
        let end = (at + src.len()).min(IMAGE_BYTES);
        bytes[at..end].copy_from_slice(&src[..end - at]);
    }
    if mode & 1 != 0 {
        reseal(&mut bytes, &image.superblock);
    }
    open_and_read(bytes);
}

/// Recomputes every checksum in `bytes` that the store keeps, using the uncorrupted image's
/// geometry `sb` to find the structures: both superblock copies, both checkpoint slots (payload CRC,
/// then header CRC), and every segment's header, record headers and their data-block CRCs.
pub fn reseal(bytes: &mut [u8], sb: &Superblock) {
    use layout::*;
    // Only structures that are there (magic intact): a zeroed slot or unused segment stays zeroed.
    for copy in 0..2 {
        let block = &mut bytes[copy * BLOCK_BYTES..(copy + 1) * BLOCK_BYTES];
        if block[..8] == SUPERBLOCK_MAGIC {
            repair_superblock(block, REPAIR_CRC);
        }
    }
    let slot_bytes = sb.checkpoint_slot_blocks as usize * BLOCK_BYTES;
    for offset in sb.checkpoint_offsets {
        let slot = &mut bytes[offset as usize..offset as usize + slot_bytes];
        if get_u32(slot, 0) != CHECKPOINT_MAGIC {
            continue;
        }
        let payload_bytes = (get_u64(slot, CK_PAYLOAD_BYTES) as usize).min(slot_bytes - BLOCK_BYTES);
        let crc = crc32fast::hash(&slot[BLOCK_BYTES..BLOCK_BYTES + payload_bytes]);
        put(slot, CK_PAYLOAD_CRC, &crc.to_le_bytes());
        repair_checkpoint_header(slot, REPAIR_CRC);
    }
    let segment_blocks = sb.segment_blocks as usize;
    for s in 0..sb.n_segments {
        let start = sb.segment_offset(s) as usize;
        let seg = &mut bytes[start..start + segment_blocks * BLOCK_BYTES];
        if get_u32(seg, 0) != SEGMENT_MAGIC {
            continue;
        }
        repair_segment_header(&mut seg[..BLOCK_BYTES], REPAIR_CRC);
        let mut cursor = 1;
        while cursor < segment_blocks {
            let header = &mut seg[cursor * BLOCK_BYTES..];
            let header_blocks = get_u32(header, REC_HEADER_BLOCKS) as usize;
            if get_u32(header, REC_MAGIC) != RECORD_MAGIC
                || !(1..=HEADER_BLOCKS_MAX as usize).contains(&header_blocks)
                || header_blocks * BLOCK_BYTES > header.len()
            {
                break;
            }
            repair_record(header, REPAIR_CRC);
            let Ok(rec) = RecordHeader::decode(header, get_u64(header, REC_STORE)) else { break };
            let data_at = cursor + header_blocks;
            let n_data = rec.crcs.len();
            if data_at + n_data > segment_blocks {
                break;
            }
            let crcs_at = REC_ENTRIES + rec.entries.len() * REC_ENTRY_BYTES;
            for i in 0..n_data {
                let crc = crc32fast::hash(&seg[(data_at + i) * BLOCK_BYTES..(data_at + i + 1) * BLOCK_BYTES]);
                put(&mut seg[cursor * BLOCK_BYTES..], crcs_at + 4 * i, &crc.to_le_bytes());
            }
            repair_record(&mut seg[cursor * BLOCK_BYTES..], REPAIR_CRC);
            cursor = data_at + n_data;
        }
    }
}

fn open_and_read(bytes: Vec<u8>) {
    // Serialise: each open starts an engine thread, and the smoke test calls this from many threads.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // Move the image in rather than let `SimDisk::new` copy it twice (its crash-image base is not
    // needed here): page faults on fresh 2 MiB copies were most of the fuzzer's time.
    let disk = SimDisk::new(Vec::new());
    disk.lock().expect("sim disk").written = bytes;
    let Ok(store) = Store::open_device(Box::new(SimDevice::new(disk)), Config::default(), "fuzz") else {
        return;
    };
    let rt = runtime();
    rt.block_on(async {
        let volumes = call(store.list_volumes()).await.expect("list_volumes failed on an open store");
        for v in volumes {
            // Bounded: a volume is never larger than the image's, unless the table is forged.
            let n_blocks = (v.size_bytes / BLOCK_BYTES as u64).min(2 * IMAGE_VOLUME_BYTES / BLOCK_BYTES as u64);
            // In runs of 8 blocks: fewer round trips to the engine thread (the fuzzer's speed),
            // while a damaged block still fails only its own run.
            for lba in (0..n_blocks).step_by(8) {
                let len = (n_blocks - lba).min(8) * BLOCK_BYTES as u64;
                match call(store.read(v.id, lba * BLOCK_BYTES as u64, len)).await {
                    Ok(got) => assert_eq!(got.len() as u64, len, "read returned {} bytes, asked for {len}", got.len()),
                    Err(Error::ShutDown) => panic!("the engine thread died while reading {:?} lba {lba}", v.id),
                    Err(_) => {}
                }
            }
        }
        // A dead engine thread leaves requests queued forever: this times out rather than hangs.
        call(store.stats()).await.expect("stats failed on an open store");
    });
    // Errors (e.g. a checkpoint write refused after corruption was found) are fine here.
    let _ = store.close();
}

/// Awaits an engine call, failing loudly if it hangs.
async fn call<T>(f: impl std::future::Future<Output = syncblock_engine::Result<T>>) -> syncblock_engine::Result<T> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(r) => r,
        Err(_) => panic!("an engine call did not complete within {CALL_TIMEOUT:?}: the engine hangs"),
    }
}
