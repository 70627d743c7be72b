//! A stable-Rust run of the `repl_frame` fuzz target's properties (`fuzz/src/repl_checks.rs`,
//! included below) on generated inputs: random bytes, mutated valid frames, and random bodies
//! behind valid headers. `FUZZ_SMOKE_CASES` sets how many of each (default 20 000).

#[path = "../../fuzz/src/repl_checks.rs"]
mod repl_checks;

use syncblock_engine::sim::Rng;
use syncblock_engine::{BlockRun, Epoch, Lba};
use syncblock_replicator::wire::{EpochStart, Frame};

fn cases() -> u64 {
    std::env::var("FUZZ_SMOKE_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(20_000)
}

fn bytes(rng: &mut Rng, max_len: u64) -> Vec<u8> {
    let n = rng.below(max_len + 1) as usize;
    (0..n).map(|_| rng.next_u64() as u8).collect()
}

fn valid(rng: &mut Rng) -> Vec<u8> {
    let history =
        vec![EpochStart { epoch: Epoch(rng.below(9)), start_tag: rng.below(1000), origin: rng.below(u64::MAX) }];
    let f = match rng.below(6) {
        0 => Frame::Hello {
            pair: rng.next_u64(),
            epoch: Epoch(rng.next_u64()),
            last_tag: rng.next_u64(),
            size_bytes: rng.next_u64(),
            volume: "v".into(),
            node: "a".into(),
            history,
        },
        1 => Frame::Write {
            tag: rng.next_u64(),
            offset: rng.next_u64(),
            fua: rng.below(2) == 1,
            data: bytes(rng, 64).into(),
        },
        2 => Frame::HelloOk {
            last_tag: 1,
            common_tag: 0,
            runs: vec![BlockRun { lba: Lba(rng.next_u64()), n_blocks: rng.below(9) }],
        },
        3 => Frame::ResyncCommit { tag: rng.next_u64(), epoch: Epoch(2), history },
        4 => Frame::WitnessPromote {
            pair: rng.next_u64(),
            volume: "v".into(),
            node: "b".into(),
            epoch: Epoch(rng.next_u64()),
            consistent: true,
            force: rng.below(2) == 1,
            reclaim: rng.below(2) == 1,
        },
        _ => Frame::Ack { applied: rng.next_u64(), durable: rng.next_u64() },
    };
    f.encode().to_vec()
}

#[test]
fn replication_frame_decoder_survives_random_mutated_and_wrapped_input() {
    let mut rng = Rng::new(0x5eed);
    for _ in 0..cases() {
        let mut input = vec![0u8];
        input.extend(bytes(&mut rng, 96));
        repl_checks::repl_frame(&input);

        let mut frame = valid(&mut rng);
        for _ in 0..1 + rng.below(3) {
            if frame.is_empty() {
                break;
            }
            let at = rng.below(frame.len() as u64) as usize;
            frame[at] ^= 1 << rng.below(8);
        }
        let mut input = vec![0u8];
        input.extend(frame);
        repl_checks::repl_frame(&input);

        let mut input = vec![1u8, 1 + rng.below(20) as u8];
        input.extend(bytes(&mut rng, 80));
        repl_checks::repl_frame(&input);
    }
}

/// The case the fuzzer found: a refusal whose body is not UTF-8 grows when decoded lossily (each
/// bad byte becomes a 3-byte replacement character) past the 4 KiB cap, which then cut it
/// mid-character.
#[test]
fn a_long_non_utf8_refusal_round_trips() {
    let mut input = vec![1u8, 3];
    input.extend(std::iter::repeat_n(0xffu8, 3000));
    repl_checks::repl_frame(&input);
    let mut input = vec![1u8, 3];
    input.extend(std::iter::repeat_n(b'x', 5000));
    repl_checks::repl_frame(&input);
}
