//! Every frame's encoding round-trips, golden bytes pin the format, and malformed input is
//! refused with an error, never a panic.
use super::*;

fn samples() -> Vec<Frame> {
    let history = vec![
        EpochStart { epoch: Epoch(1), start_tag: 1, origin: 7 },
        EpochStart { epoch: Epoch(3), start_tag: 90, origin: u64::MAX },
    ];
    vec![
        Frame::Hello {
            pair: 0xfeed,
            epoch: Epoch(3),
            last_tag: 99,
            size_bytes: 1 << 30,
            volume: "db".into(),
            node: "a".into(),
            history: history.clone(),
        },
        Frame::HelloOk {
            last_tag: 95,
            common_tag: 90,
            runs: vec![BlockRun { lba: Lba(1), n_blocks: 2 }, BlockRun { lba: Lba(100), n_blocks: 7 }],
        },
        Frame::Refuse { why: Refusal::Deposed { epoch: Epoch(4) }, reason: "stale epoch".into() },
        Frame::Refuse { why: Refusal::Busy, reason: String::new() },
        Frame::Refuse { why: Refusal::NeverSynced, reason: "new pair".into() },
        Frame::Refuse { why: Refusal::PrimaryAlive { retry_after_ms: 250 }, reason: "alive".into() },
        Frame::Write { tag: 7, offset: 4096, fua: true, data: Bytes::from_static(&[1; 512]) },
        Frame::Trim { tag: 8, offset: 0, len: 1 << 40 },
        Frame::Zeroes { tag: 9, offset: 512, len: 1024, may_trim: true, fua: false },
        Frame::Flush { upto: 9 },
        Frame::Ack { applied: 9, durable: 8 },
        Frame::Ping { epoch: Epoch(3), nonce: 77, floor: 5 },
        Frame::Pong { nonce: 77 },
        Frame::ResyncBegin { common_tag: 90 },
        Frame::ResyncCommit { tag: 120, epoch: Epoch(3), history },
        Frame::WitnessReport { pair: 9, volume: "db".into(), node: "a".into(), epoch: Epoch(3), in_sync: true },
        Frame::WitnessSolo { pair: 9, volume: "db".into(), node: "a".into(), epoch: Epoch(3) },
        Frame::WitnessPromote {
            pair: 9,
            volume: "db".into(),
            node: "b".into(),
            epoch: Epoch(3),
            consistent: true,
            force: false,
            reclaim: true,
        },
        Frame::WitnessGrant { epoch: Epoch(4), primary: "b".into(), solo: false, lease_ms: 500 },
        Frame::WitnessHandover { pair: 9, volume: "db".into(), node: "a".into(), epoch: Epoch(3), to: "b".into() },
        Frame::WriteBlocks { tag: 8, lbas: vec![9, 3, 1 << 40], data: Bytes::from(vec![6u8; 3 * 4096]) },
        Frame::CrcRequest { id: 5, offset: 8 << 20, len: 8 << 20 },
        Frame::CrcReply { id: 5, offset: 8 << 20, crcs: vec![Some(7), None, None, Some(0), Some(u32::MAX)] },
        Frame::CrcReply { id: 6, offset: 0, crcs: vec![] },
        Frame::CrcReply { id: 7, offset: 0, crcs: (0..16).map(|i| (i % 3 != 0).then_some(i)).collect() },
    ]
}

#[test]
fn every_frame_round_trips() {
    for f in samples() {
        assert_eq!(decode_frame(&f.encode()).unwrap(), f);
    }
}

#[test]
fn a_split_write_is_the_same_bytes_as_an_encoded_one() {
    for len in [SPLIT_PAYLOAD_MIN, 1 << 20] {
        let f = Frame::Write { tag: 9, offset: 1 << 30, fua: true, data: Bytes::from(vec![7u8; len]) };
        let (head, payload) = f.encode_split().expect("large enough to split");
        assert_eq!([&head[..], &payload[..]].concat(), f.encode().to_vec());
    }
    let lbas: Vec<u64> = (0..WRITE_BLOCKS_MAX as u64).rev().collect();
    let blocks = Frame::WriteBlocks { tag: 3, lbas, data: Bytes::from(vec![9u8; WRITE_BLOCKS_MAX * 4096]) };
    let (head, payload) = blocks.encode_split().expect("a read's blocks split");
    assert_eq!([&head[..], &payload[..]].concat(), blocks.encode().to_vec());
    assert_eq!(decode_frame(&blocks.encode()).unwrap(), blocks);
    let small = Frame::Write { tag: 1, offset: 0, fua: false, data: Bytes::from(vec![1u8; 4096]) };
    assert!(small.encode_split().is_none() && Frame::Flush { upto: 1 }.encode_split().is_none());
}

#[test]
fn golden_bytes_of_an_ack() {
    let b = Frame::Ack { applied: 1, durable: 0 }.encode();
    assert_eq!(&b[..12], &[b'S', b'B', b'R', b'P', 5, 0, 8, 0, 16, 0, 0, 0]);
    assert_eq!(&b[16..], &[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
}

#[test]
fn golden_bytes_of_a_history_entry() {
    let history = vec![EpochStart { epoch: Epoch(2), start_tag: 51, origin: 0x0102_0304_0506_0708 }];
    let b = Frame::ResyncCommit { tag: 9, epoch: Epoch(2), history }.encode();
    let mut body = vec![9, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 1, 0];
    body.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 0, 51, 0, 0, 0, 0, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1]);
    assert_eq!(&b[16..], &body[..]);
}

#[test]
fn garbage_other_versions_and_corruption_are_refused() {
    assert!(matches!(decode_frame(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), Err(WireError::BadMagic(_))));
    let mut b = Frame::Pong { nonce: 1 }.encode().to_vec();
    b[4] = 1;
    assert_eq!(decode_frame(&b), Err(WireError::Version { got: 1 }));
    let mut b = Frame::Pong { nonce: 1 }.encode().to_vec();
    b[20] ^= 1;
    assert!(matches!(decode_frame(&b), Err(WireError::Checksum { .. })));
    let mut b = Frame::Pong { nonce: 1 }.encode().to_vec();
    b[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(decode_frame(&b), Err(WireError::TooLarge(u32::MAX as usize)));
}

/// A frame with a valid header and checksum around any body.
fn sealed(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    out.put_u32_le(MAGIC);
    out.put_u16_le(PROTOCOL_VERSION);
    out.put_u8(kind);
    out.put_u8(0);
    out.put_u32_le(body.len() as u32);
    let mut h = crc32fast::Hasher::new();
    h.update(&out[..12]);
    h.update(body);
    out.put_u32_le(h.finalize());
    out.extend_from_slice(body);
    out.to_vec()
}

#[test]
fn golden_bytes_of_a_crc_reply_and_malformed_ones_are_refused() {
    let f = Frame::CrcReply { id: 1, offset: 4096, crcs: vec![Some(0x0102_0304), None, Some(5)] };
    let b = f.encode();
    let mut body = vec![1, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0b101];
    body.extend_from_slice(&[4, 3, 2, 1, 5, 0, 0, 0]);
    assert_eq!(&b[6], &18);
    assert_eq!(&b[16..], &body[..]);
    assert_eq!(decode_frame(&sealed(18, &body)).unwrap(), f);
    let malformed = |body: &[u8]| decode_frame(&sealed(18, body)) == Err(WireError::Malformed("crc-reply"));
    // A CRC missing, one too many, the bitmap cut short, a bit set past the last block.
    assert!(malformed(&body[..body.len() - 1]));
    assert!(malformed(&[&body[..], &[0]].concat()));
    assert!(malformed(&body[..20]));
    let mut padded = body.clone();
    padded[20] |= 0b1000;
    assert!(malformed(&padded));
    // More blocks than any request may cover.
    let mut huge = body[..16].to_vec();
    huge.extend_from_slice(&(CRC_BLOCKS_MAX as u32 + 1).to_le_bytes());
    assert!(malformed(&huge));
    // A request with a field missing.
    assert_eq!(decode_frame(&sealed(17, &[0; 23])), Err(WireError::Malformed("crc-request")));
}

#[test]
fn refusals_carry_a_code_and_unknown_or_non_canonical_ones_are_malformed() {
    let f = Frame::Refuse { why: Refusal::Deposed { epoch: Epoch(7) }, reason: "b is primary".into() };
    let b = f.encode();
    let mut body = vec![1, 0, 7, 0, 0, 0, 0, 0, 0, 0];
    body.extend_from_slice(b"b is primary");
    assert_eq!(&b[16..], &body[..]);
    let malformed = |body: &[u8]| decode_frame(&sealed(3, body)) == Err(WireError::Malformed("refuse"));
    // An unknown code; an argument on a code that takes none; too short for the code.
    assert!(malformed(&[99, 0, 0, 0, 0, 0, 0, 0, 0, 0]));
    assert!(malformed(&[6, 0, 1, 0, 0, 0, 0, 0, 0, 0]));
    assert!(malformed(&[1, 0, 7]));
    assert_eq!(
        decode_frame(&sealed(3, &[6, 0, 0, 0, 0, 0, 0, 0, 0, 0])).unwrap(),
        Frame::Refuse { why: Refusal::SoloPrimary, reason: String::new() }
    );
}

proptest::proptest! {
    #[test]
    fn decoding_arbitrary_bytes_never_panics(b in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
        let _ = decode_frame(&b);
        // With a valid header and checksum, the body decoder sees the garbage too.
        for kind in 1..=19u8 {
            if let Ok(f) = decode_frame(&sealed(kind, &b)) {
                proptest::prop_assert_eq!(decode_frame(&f.encode()).unwrap(), f);
            }
        }
    }
}

/// A hello answer's runs are (first block, number of blocks), little-endian, after their count.
#[test]
fn hello_ok_runs_are_first_block_then_block_count() {
    let runs = vec![BlockRun { lba: Lba(3), n_blocks: 4 }];
    let b = Frame::HelloOk { last_tag: 1, common_tag: 2, runs }.encode();
    let body = &b[HEADER_BYTES..];
    assert_eq!(body.len(), 8 + 8 + 4 + 16);
    assert_eq!(&body[16..20], &1u32.to_le_bytes());
    assert_eq!(&body[20..28], &3u64.to_le_bytes());
    assert_eq!(&body[28..36], &4u64.to_le_bytes());
}

#[test]
fn scattered_blocks_must_match_their_count() {
    let malformed = |body: &[u8]| decode_frame(&sealed(20, body)) == Err(WireError::Malformed("write-blocks"));
    let frame = |n: u32, lbas: usize, blocks: usize| {
        let mut b = 7u64.to_le_bytes().to_vec();
        b.extend(n.to_le_bytes());
        b.extend(vec![0u8; lbas * 8 + blocks * 4096]);
        b
    };
    assert!(!malformed(&frame(2, 2, 2)));
    assert!(malformed(&frame(0, 0, 0)), "no block");
    assert!(malformed(&frame(2, 2, 1)), "a block short");
    assert!(malformed(&frame(2, 2, 3)), "a block too many");
    assert!(malformed(&frame(2, 1, 0)), "LBAs short");
    assert!(malformed(&frame(WRITE_BLOCKS_MAX as u32 + 1, 0, 0)), "more than a read");
}
