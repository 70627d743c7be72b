//! Fuzz target `repl_frame`: see `syncblock_fuzz::repl_checks::repl_frame` for the input format and the properties.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| syncblock_fuzz::repl_checks::repl_frame(data));
