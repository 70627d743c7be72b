//! Fuzz target `superblock`: see `syncblock_fuzz::checks::superblock` for the input format and the properties.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| syncblock_fuzz::checks::superblock(data));
