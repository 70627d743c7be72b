//! Properties of the replication wire decoder, shared by the cargo-fuzz target `repl_frame` and
//! the stable-Rust smoke test `replicator/tests/fuzz_smoke.rs`.

use syncblock_replicator::wire::{decode_frame, HEADER_BYTES, MAGIC, PROTOCOL_VERSION};

/// `repl_frame` target. Input: a mode byte, then bytes. Mode bit 0 clear: the bytes are a whole
/// frame as received (garbage, truncations, bad checksums). Set: the next byte is a frame kind and
/// the rest its body, wrapped in a valid header and checksum, so the body decoders see the input.
/// Properties: no panic; whatever decodes re-encodes to a frame that decodes to the same value.
pub fn repl_frame(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let frame_bytes = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        let Some((&kind, body)) = rest.split_first() else { return };
        let mut b = Vec::with_capacity(HEADER_BYTES + body.len());
        b.extend_from_slice(&MAGIC.to_le_bytes());
        b.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        b.push(kind);
        b.push(0);
        b.extend_from_slice(&(body.len() as u32).to_le_bytes());
        let mut h = crc32fast::Hasher::new();
        h.update(&b[..12]);
        h.update(body);
        b.extend_from_slice(&h.finalize().to_le_bytes());
        b.extend_from_slice(body);
        b
    };
    if let Ok(frame) = decode_frame(&frame_bytes) {
        let again = decode_frame(&frame.encode()).expect("a re-encoded frame decodes");
        assert_eq!(again, frame, "decode(encode(frame)) differs from frame");
    }
}
