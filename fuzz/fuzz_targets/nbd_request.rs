//! Fuzz target `nbd_request`: see `syncblock_fuzz::nbd_checks::nbd_request` for the input format and the properties.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| syncblock_fuzz::nbd_checks::nbd_request(data));
