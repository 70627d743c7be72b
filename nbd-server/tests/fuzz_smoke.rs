//! A stable-Rust run of the NBD fuzz targets' properties (`fuzz/src/nbd_checks.rs`, included below),
//! so that every `cargo test` feeds the handshake and the request decoder thousands of inputs:
//! random bytes and, mostly, valid option sequences and request headers mutated a little.
//! Coverage-guided fuzzing (`fuzz/run-smoke.sh`, cargo-fuzz) goes further; this catches regressions.
//!
//! A panic fails the test after printing the failing input and saving it where
//! `cargo fuzz run <target> <file>` can replay it. `SYNCBLOCK_FUZZ_SMOKE_CASES` scales the number
//! of cases (default 20000 per target).

#[path = "../../fuzz/src/nbd_checks.rs"]
mod nbd_checks;

mod common;
use common::{info_payload, meta_payload};

use syncblock_engine::sim::Rng;
use syncblock_nbd::proto;

const CASES_DEFAULT: u64 = 20_000;

fn cases() -> u64 {
    std::env::var("SYNCBLOCK_FUZZ_SMOKE_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(CASES_DEFAULT)
}

/// Runs `target` on `input`; on a panic, saves the input and fails naming the replay command.
fn run(name: &str, target: fn(&[u8]), input: &[u8]) {
    if std::panic::catch_unwind(|| target(input)).is_err() {
        let path = std::env::temp_dir().join(format!("syncblock-fuzz-smoke-{name}.bin"));
        let _ = std::fs::write(&path, input);
        panic!(
            "fuzz smoke: target {name} failed on {} input bytes {input:02x?}, saved to {} (replay: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run {name} {})",
            input.len(),
            path.display(),
            path.display()
        );
    }
}

fn random_bytes(rng: &mut Rng, max_len: u64) -> Vec<u8> {
    let n = rng.below(max_len + 1) as usize;
    (0..n).map(|_| rng.next_u64() as u8).collect()
}

/// `b` with a few bytes flipped, overwritten, inserted or deleted.
fn mutated(rng: &mut Rng, mut b: Vec<u8>) -> Vec<u8> {
    for _ in 0..=rng.below(4) {
        match rng.below(5) {
            0 if !b.is_empty() => {
                let i = rng.below(b.len() as u64) as usize;
                b[i] ^= 1 << rng.below(8);
            }
            1 if !b.is_empty() => {
                let i = rng.below(b.len() as u64) as usize;
                b[i] = [0, 0xff, 0x7f, 0x80, 1][rng.below(5) as usize];
            }
            2 => {
                let i = rng.below(b.len() as u64 + 1) as usize;
                b.insert(i, rng.next_u64() as u8);
            }
            3 if !b.is_empty() => {
                let i = rng.below(b.len() as u64) as usize;
                b.remove(i);
            }
            _ => b.truncate(rng.below(b.len() as u64 + 1) as usize),
        }
    }
    b
}

fn name(rng: &mut Rng) -> &'static str {
    ["", "vol", "ro", "nope", "base:allocation", "base:"][rng.below(6) as usize]
}

/// One option in the target's input format: selector (index into its known options), 16-bit length, payload.
fn option(sel: u8, payload: &[u8]) -> Vec<u8> {
    let mut b = vec![sel];
    b.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    b.extend_from_slice(payload);
    b
}

/// A plausible negotiation: the setup byte (TLS mode and admissions), client flags, then a few
/// options with valid payloads (STARTTLS among them), usually ending in GO.
fn valid_handshake(rng: &mut Rng) -> Vec<u8> {
    let mut b = vec![rng.next_u64() as u8, 0, 0, 0, [3u8, 1, 0, 2][rng.below(4) as usize]];
    for _ in 0..rng.below(6) {
        let o = match rng.below(8) {
            0 => option(2, &[]),                                                           // LIST
            1 => option(6, &[]),                                                           // STRUCTURED_REPLY
            2 => option(4, &info_payload(name(rng), &[1, 2, 3][..rng.below(4) as usize])), // INFO
            3 => option(7, &meta_payload(name(rng), &["base:allocation", "base:"][..rng.below(3) as usize])),
            4 => option(8, &meta_payload(name(rng), &["base:allocation", "qemu:x"][..rng.below(3) as usize])),
            5 => option(11 + rng.below(5) as u8, b"junk"), // a raw, unknown option number
            6 => option(0xc5, &info_payload(name(rng), &[])), // GO flagged oversized
            _ => option(3, &[]),                           // STARTTLS
        };
        b.extend_from_slice(&o);
    }
    match rng.below(4) {
        0 => b.extend_from_slice(&option(0, name(rng).as_bytes())), // EXPORT_NAME
        1 => b.extend_from_slice(&option(1, &[])),                  // ABORT
        _ => b.extend_from_slice(&option(5, &info_payload(name(rng), &[3]))), // GO
    }
    b
}

fn valid_request(rng: &mut Rng) -> Vec<u8> {
    let mut b = proto::REQUEST_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&(rng.below(32) as u16).to_be_bytes());
    b.extend_from_slice(&(rng.below(9) as u16).to_be_bytes());
    b.extend_from_slice(&rng.next_u64().to_be_bytes());
    b.extend_from_slice(&(rng.below(1 << 27) * 512).to_be_bytes());
    b.extend_from_slice(&(rng.below(1 << 16) as u32 * 512).to_be_bytes());
    b
}

/// One to five valid request headers in a row.
fn valid_requests(rng: &mut Rng) -> Vec<u8> {
    (0..=rng.below(4)).flat_map(|_| valid_request(rng)).collect()
}

/// Runs `target` on `cases()` inputs from `seed`: a quarter random bytes (up to `random_max_len`),
/// a quarter `valid` ones, and half `valid` ones mutated.
fn feed(name: &str, target: fn(&[u8]), seed: u64, random_max_len: u64, valid: fn(&mut Rng) -> Vec<u8>) {
    let mut rng = Rng::new(seed);
    for case in 0..cases() {
        let input = match case % 4 {
            0 => random_bytes(&mut rng, random_max_len),
            1 => valid(&mut rng),
            _ => {
                let b = valid(&mut rng);
                mutated(&mut rng, b)
            }
        };
        run(name, target, &input);
    }
}

#[test]
fn nbd_handshake_survives_random_and_mutated_negotiations() {
    feed("nbd_handshake", nbd_checks::nbd_handshake, 0x6e62_6468, 256, valid_handshake);
}

#[test]
fn nbd_handshake_reaches_transmission_from_valid_input() {
    // The generator is not vacuous: a plain GO for the default export enters transmission, and so
    // the target's transmission checks run.
    use syncblock_nbd::handshake::{Negotiation, Step};
    let mut n = Negotiation::new(proto::decode_client_flags([0, 0, 0, 3]).unwrap());
    let mut out = bytes::BytesMut::new();
    let step = n.on_option(proto::OPT_GO, &info_payload("", &[3]), &nbd_checks::exports(), &mut out);
    assert!(matches!(step, Step::Transmit(_)));
    run(
        "nbd_handshake",
        nbd_checks::nbd_handshake,
        &[&[0, 0, 0, 0, 3][..], &option(5, &info_payload("", &[3]))].concat(),
    );
    // And in require mode through STARTTLS.
    let starttls = [&[2, 0, 0, 0, 3][..], &option(3, &[]), &option(5, &info_payload("", &[3]))].concat();
    run("nbd_handshake", nbd_checks::nbd_handshake, &starttls);
}

#[test]
fn nbd_request_survives_random_and_mutated_headers() {
    feed("nbd_request", nbd_checks::nbd_request, 0x7265_7175, 100, valid_requests);
}
