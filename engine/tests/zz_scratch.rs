mod common;
use common::*;
use syncblock_engine::format::{CheckpointHeader, Superblock};
use syncblock_engine::{Config, Lsn, BLOCK_BYTES};
use bytes::Bytes;

fn try_edit(name: &str, edit: impl Fn(&mut CheckpointHeader)) {
    let disk = sim_disk(16 << 20, 1 << 20);
    {
        let rt = rt();
        let s = open_sim(&disk, Config::default()).unwrap();
        let v = rt.block_on(s.create_volume("v", 1 << 20)).unwrap();
        rt.block_on(s.write(v.id, 0, Bytes::from(vec![1u8; 8192]), true)).unwrap();
        s.close().unwrap();
    }
    {
        let mut d = disk.lock().unwrap();
        let sb = Superblock::decode(&d.written[..BLOCK_BYTES]).unwrap();
        for slot in 0..2 {
            let at = sb.checkpoint_offsets[slot] as usize;
            if let Ok(mut h) = CheckpointHeader::decode(&d.written[at..at + BLOCK_BYTES], sb.store_id) {
                edit(&mut h);
                d.written[at..at + BLOCK_BYTES].copy_from_slice(&h.encode());
            }
        }
    }
    let r = std::panic::catch_unwind(|| {
        let rt = rt();
        match open_sim(&disk, Config::default()) {
            Err(e) => format!("open err: {e}"),
            Ok(s) => {
                let v = rt.block_on(s.volume("v"));
                let w = v.as_ref().ok().map(|v| rt.block_on(async { let a = s.write(v.id, 4096, Bytes::from(vec![2u8; 4096]), false).await; let b = s.flush().await; (a.is_ok(), b.is_ok()) }));
                let c = s.close();
                format!("opened; volume {:?}; write/flush {:?}; close {:?}", v.map(|v| v.size_bytes), w, c.map_err(|e| e.to_string()))
            }
        }
    });
    eprintln!("CASE {name}: {:?}", r.map_err(|_| "PANIC"));
}

#[test]
fn scratch() {
    try_edit("seq max", |h| h.seq = u64::MAX);
    try_edit("next_lsn max", |h| h.next_lsn = Lsn(u64::MAX));
    try_edit("next_segment_seq 0", |h| h.next_segment_seq = 0);
    try_edit("next_segment_seq max", |h| h.next_segment_seq = u64::MAX);
    try_edit("tail_seq max", |h| h.tail_seq = u64::MAX);
    try_edit("tail_block 0", |h| h.tail_block = 0);
    try_edit("payload_bytes max", |h| h.payload_bytes = u64::MAX);
    try_edit("payload_bytes huge", |h| h.payload_bytes = u64::MAX - 4096);
}
