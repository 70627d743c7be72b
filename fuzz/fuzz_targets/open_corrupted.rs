//! Fuzz target `open_corrupted`: see `syncblock_fuzz::checks::open_corrupted` for the input format and the properties.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| syncblock_fuzz::checks::open_corrupted(data));
