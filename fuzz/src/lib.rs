//! The fuzz targets' bodies live in `checks.rs`, which `engine/tests/fuzz_smoke.rs` also includes,
//! so that the stable-Rust smoke run and libFuzzer exercise exactly the same properties.

#[path = "checks.rs"]
pub mod checks;
