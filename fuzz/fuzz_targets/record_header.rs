//! Fuzz target `record_header`: see `syncblock_fuzz::checks::record_header` for the input format and the properties.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| syncblock_fuzz::checks::record_header(data));
