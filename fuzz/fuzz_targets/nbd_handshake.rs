//! Fuzz target `nbd_handshake`: see `syncblock_fuzz::nbd_checks::nbd_handshake` for the input format and the properties.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| syncblock_fuzz::nbd_checks::nbd_handshake(data));
